"""Interop with PyTorch's backdoor ecosystem (BackdoorBench, the D3 paper's released models).

* :func:`load_torch_checkpoint` reads ``torch.save`` archives and ``.safetensors`` files without
  executing pickled code, and without PyTorch installed.
* :func:`from_torch_state_dict` / :func:`to_torch_state_dict` convert between d3jax variables and
  state dicts in BackdoorBench's parameter names (``preact_resnet18``, ``vgg19_bn``, ``vgg11``,
  torchvision's ViT names for ``vit``/``vit_b16``, and d3jax's ``small_cnn``), giving the same
  logits in both frameworks.
* :mod:`d3jax.interop.torch_models` (needs PyTorch) builds those architectures in PyTorch.
* :func:`save_torch_state_dict` writes ``.safetensors`` (numpy only) or ``.pt`` (needs PyTorch).
"""
from d3jax.interop.files import SUFFIXES, load_torch_checkpoint, save_torch_state_dict
from d3jax.interop.layouts import (from_torch_state_dict, infer_model_options,
                                  to_torch_state_dict)
from d3jax.interop.torch_pickle import UnsafeCheckpointError

__all__ = ["SUFFIXES", "UnsafeCheckpointError", "from_torch_state_dict", "infer_model_options",
           "load_torch_checkpoint",
           "save_torch_state_dict", "to_torch_state_dict"]
