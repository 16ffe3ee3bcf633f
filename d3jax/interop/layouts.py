"""d3jax variables ↔ PyTorch state dicts in BackdoorBench's parameter names.

BackdoorBench's ``preact_resnet18`` (its ``models/preact_resnet.py``) and ``vgg19_bn``
(torchvision's ``vgg19_bn``) are the D3 paper's models (Sec. 4.1); d3jax's
:mod:`d3jax.models` build the same functions, so a converted model gives the same logits.
``small_cnn`` (d3jax's own) converts too, under the PyTorch names of its layers, and ``vit`` /
``vit_b16`` under torchvision's ``VisionTransformer`` names (BackdoorBench's ``vit_b_16`` is that
model behind a resize, its keys prefixed ``1.``, which is stripped on import).

Conversions, per leaf:

* Conv ``weight`` (out, in, kh, kw) ↔ ``kernel`` (kh, kw, in, out) (OIHW → HWIO). Padding needs no
  conversion: d3jax pads 3×3 convolutions by one pixel on every side for every stride, as PyTorch's
  ``padding=1`` does (XLA's ``"SAME"`` would pad stride-2 layers asymmetrically).
* Linear ``weight`` (out, in) ↔ Dense ``kernel`` (in, out). VGG's ``classifier.0`` reads the 7×7
  feature map flattened as (C, H, W); d3jax's ``fc1`` flattens (H, W, C), so its rows are permuted.
* BatchNorm ``weight``/``bias`` ↔ ``params`` ``scale``/``bias``; ``running_mean``/``running_var`` ↔
  ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` is read and ignored (it only matters
  for PyTorch's cumulative-average mode, which BackdoorBench does not use) and written as 0.
* A ``module.`` prefix (``nn.DataParallel``/DDP checkpoints) is stripped on import, as BackdoorBench
  does when it loads a stored model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.models import get_model
from d3jax.models.vgg import CONFIGS as VGG_CONFIGS

Variables = dict[str, Any]


@dataclass(frozen=True)
class _Leaf:
  """One d3jax leaf: its collection and path, its PyTorch name and how its value converts."""

  collection: str
  path: tuple[str, ...]
  torch_name: str
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]


def _identity(value: np.ndarray) -> np.ndarray:
  return value


def _conv_to_torch(kernel: np.ndarray) -> np.ndarray:
  return kernel.transpose(3, 2, 0, 1)


def _conv_from_torch(weight: np.ndarray) -> np.ndarray:
  return weight.transpose(2, 3, 1, 0)


def _dense_transpose(value: np.ndarray) -> np.ndarray:
  return value.T


def _flattened_dense(height: int, width: int) -> tuple[Callable, Callable]:
  """Converters for a Dense layer whose input is a (H, W, C) map flattened: PyTorch (C, H, W)."""

  def to_torch(kernel: np.ndarray) -> np.ndarray:  # (H·W·C, out) -> (out, C·H·W)
    channels = kernel.shape[0] // (height * width)
    hwc = kernel.reshape(height, width, channels, -1)
    return hwc.transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)

  def from_torch(weight: np.ndarray) -> np.ndarray:  # (out, C·H·W) -> (H·W·C, out)
    channels = weight.shape[1] // (height * width)
    chw = weight.reshape(weight.shape[0], channels, height, width)
    return chw.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])

  return to_torch, from_torch


_BN_NAMES = {("params", "scale"): "weight", ("params", "bias"): "bias",
             ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _preact_module(path: tuple[str, ...]) -> str:
  """``layer2_0/shortcut`` → ``layer2.0.shortcut.0`` (BackdoorBench's names)."""
  parts = []
  for part in path:
    match = re.fullmatch(r"layer(\d)_(\d)", part)
    parts.append(f"layer{match[1]}.{match[2]}" if match else
                 "shortcut.0" if part == "shortcut" else part)
  return ".".join(parts)


def _vgg_modules(depth: int, batch_norm: bool) -> dict[str, str]:
  """d3jax VGG module → torchvision name: ``conv{i}``/``bn{i}`` → ``features.k``, the head →
  ``classifier.0/3/6`` (torchvision's Sequential: conv, [BN,] ReLU per conv; one entry per pool)."""
  names, position, index = {}, 0, 0
  for entry in VGG_CONFIGS[depth]:
    if entry == "M":
      position += 1
      continue
    index += 1
    names[f"conv{index}"] = f"features.{position}"
    names[f"bn{index}"] = f"features.{position + 1}"
    position += 3 if batch_norm else 2
  names.update(fc1="classifier.0", fc2="classifier.3", linear="classifier.6")
  return names


def _vit_leaf(collection: str, path: tuple[str, ...]) -> _Leaf:
  """A ViT leaf under torchvision's ``VisionTransformer`` names (``conv_proj``, ``class_token``,
  ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2,
  mlp.0, mlp.3}``, ``encoder.ln``, ``heads.head``); the fused ``qkv`` projection is
  ``self_attention.in_proj_weight``/``in_proj_bias`` (rows q, k, v, heads contiguous in each)."""
  *module, leaf = path
  suffix = "weight" if leaf in ("kernel", "scale") else leaf
  convert = (_conv_to_torch, _conv_from_torch) if module == ["conv_proj"] and leaf == "kernel" \
      else (_dense_transpose, _dense_transpose) if leaf == "kernel" else (_identity, _identity)
  if not module:
    return _Leaf(collection, path, {"class_token": "class_token",
                                    "pos_embedding": "encoder.pos_embedding"}[leaf], *convert)
  head = {"conv_proj": "conv_proj", "ln": "encoder.ln", "linear": "heads.head"}.get(module[0])
  if head is None:
    block = f"encoder.layers.encoder_layer_{module[0][len('block'):]}"
    part = {"ln_1": "ln_1", "ln_2": "ln_2", "mlp1": "mlp.0", "mlp2": "mlp.3",
            "attention": "self_attention"}[module[1]]
    if module[1:] == ["attention", "qkv"]:
      return _Leaf(collection, path, f"{block}.self_attention.in_proj_{suffix}", *convert)
    if module[1:] == ["attention", "out"]:
      part = "self_attention.out_proj"
    head = f"{block}.{part}"
  return _Leaf(collection, path, f"{head}.{suffix}", *convert)


def _module_name(model_name: str, path: tuple[str, ...]) -> str:
  if model_name == "preact_resnet18":
    return _preact_module(path)
  if model_name.startswith("vgg"):
    depth = int(re.match(r"vgg(\d+)", model_name)[1])
    return _vgg_modules(depth, model_name.endswith("_bn"))[path[0]]
  return ".".join(path)


def _leaves(model_name: str, template: Variables, options: Mapping[str, Any]) -> list[_Leaf]:
  """The conversion of every leaf of ``template`` (shapes of the model's variables)."""
  leaves = []
  flat = flax.traverse_util.flatten_dict(template)
  for (collection, *path), value in flat.items():
    module, leaf = tuple(path[:-1]), path[-1]
    if model_name.startswith("vit"):
      leaves.append(_vit_leaf(collection, tuple(path)))
      continue
    torch_module = _module_name(model_name, module)
    if (collection, leaf) in _BN_NAMES and module[-1].startswith("bn"):
      leaves.append(_Leaf(collection, tuple(path), f"{torch_module}.{_BN_NAMES[collection, leaf]}",
                          _identity, _identity))
    elif leaf == "bias":
      leaves.append(_Leaf(collection, tuple(path), f"{torch_module}.bias", _identity, _identity))
    elif len(value.shape) == 4:
      leaves.append(_Leaf(collection, tuple(path), f"{torch_module}.weight", _conv_to_torch,
                          _conv_from_torch))
    elif module == ("fc1",) and not options.get("small_input", False):
      to_torch, from_torch = _flattened_dense(7, 7)
      leaves.append(_Leaf(collection, tuple(path), f"{torch_module}.weight", to_torch, from_torch))
    else:
      leaves.append(_Leaf(collection, tuple(path), f"{torch_module}.weight", _dense_transpose,
                          _dense_transpose))
  return leaves


def _template(model_name: str, num_classes: int, in_channels: int,
              options: Mapping[str, Any], size: int = 32) -> Variables:
  """Shapes of ``get_model(model_name, ...)``'s variables for ``size``² ``in_channels``-channel
  images."""
  model = get_model(model_name, num_classes, **options)
  images = jnp.zeros((1, size, size, in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  return flax.core.unfreeze(shapes)


def _bn_counters(leaves: list[_Leaf]) -> list[str]:
  return sorted({leaf.torch_name.rsplit(".", 1)[0] + ".num_batches_tracked"
                 for leaf in leaves if leaf.torch_name.endswith(".running_mean")})


def _first_conv_name(model_name: str) -> str:
  if model_name.startswith("vit"):
    return "conv_proj.weight"
  return "features.0.weight" if model_name.startswith("vgg") else "conv1.weight"


def _image_size(model_name: str, tensors: Mapping[str, np.ndarray]) -> int:
  """The image side the template is built at: 32, or for a ViT the side its position embedding
  was made for (patch size × √(tokens − 1)), which fixes the embedding's length."""
  if not model_name.startswith("vit") or "encoder.pos_embedding" not in tensors:
    return 32
  patch = int(tensors["conv_proj.weight"].shape[-1])
  return patch * int(round(np.sqrt(tensors["encoder.pos_embedding"].shape[1] - 1)))


def _listed(names: list[str], limit: int = 3) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def from_torch_state_dict(model_name: str, state_dict: Mapping[str, Any], num_classes: int,
                          **model_options: Any) -> Variables:
  """d3jax variables (``{'params', 'batch_stats'}``) of ``get_model(model_name, num_classes,
  **model_options)`` from a PyTorch state dict in BackdoorBench's names (module docstring).

  ``state_dict`` values may be numpy arrays or torch tensors. The input channel count is read
  from the first convolution, so 1-channel (MNIST) checkpoints convert too.

  Raises:
    ValueError: an unknown model, or in one line every missing, unexpected or mis-shaped tensor.
  """
  tensors = {_strip_prefix(name): _to_numpy(value) for name, value in state_dict.items()}
  if model_name.startswith("vit") and tensors and all(n.startswith("1.") for n in tensors):
    tensors = {name[2:]: value for name, value in tensors.items()}  # BackdoorBench's (Resize, vit)
  first = _first_conv_name(model_name)
  get_model(model_name, num_classes, **model_options)  # validates the name and the options
  if first not in tensors or np.ndim(tensors[first]) != 4:
    raise ValueError(
        f"state dict has no 4-D {first} (the first convolution of {model_name}); its first "
        f"tensors are {_listed(list(tensors))}: is it a {model_name} checkpoint?")
  size = model_options.get("resize") or _image_size(model_name, tensors)
  template = _template(model_name, num_classes, int(tensors[first].shape[1]), model_options, size)
  leaves = _leaves(model_name, template, model_options)
  expected = {leaf.torch_name for leaf in leaves}
  missing = [leaf.torch_name for leaf in leaves if leaf.torch_name not in tensors]
  unexpected = [name for name in tensors
                if name not in expected and not name.endswith(".num_batches_tracked")]
  if missing or unexpected:
    parts = ([f"lacks {len(missing)} tensor(s) ({_listed(missing)})"] if missing else []) + (
        [f"has {len(unexpected)} unexpected tensor(s) ({_listed(unexpected)})"]
        if unexpected else [])
    raise ValueError(f"state dict does not match {model_name}: it {' and '.join(parts)}.")
  flat = flax.traverse_util.flatten_dict(template)
  converted = {}
  position = {name: index for index, name in enumerate(tensors)}
  for leaf in sorted(leaves, key=lambda leaf: position[leaf.torch_name]):  # report the first
    want = tuple(flat[(leaf.collection, *leaf.path)].shape)
    value = tensors[leaf.torch_name]
    torch_shape = tuple(leaf.to_torch(np.zeros(want, np.float32)).shape)
    if tuple(value.shape) != torch_shape:
      raise ValueError(
          f"tensor {leaf.torch_name} has shape {tuple(value.shape)}, but {model_name} with "
          f"num_classes={num_classes} and options {dict(model_options)} expects {torch_shape}.")
    converted[(leaf.collection, *leaf.path)] = jnp.asarray(
        leaf.from_torch(value.astype(np.float32)))
  return flax.traverse_util.unflatten_dict(converted)


def infer_model_options(model_name: str, state_dict: Mapping[str, Any]) -> dict[str, int]:
  """The size options of ``model_name`` that ``state_dict`` was built with: ``width`` from the
  first convolution, and VGG's ``hidden`` from ``classifier.0`` (BackdoorBench's published models
  give the defaults, 64 and 4096; smaller PyTorch builds convert too).

  Raises:
    ValueError: the state dict lacks the tensors the options are read from.
  """
  tensors = {_strip_prefix(name): value for name, value in state_dict.items()}
  if model_name.startswith("vit"):
    return _vit_options(model_name, tensors)
  needed = [_first_conv_name(model_name)] + (["classifier.0.weight"]
                                             if model_name.startswith("vgg") else [])
  for name in needed:
    if name not in tensors or np.ndim(tensors[name]) not in (2, 4):
      raise ValueError(f"state dict has no {name} to read {model_name}'s size from; is it a "
                       f"{model_name} checkpoint?")
  options = {"width": int(np.shape(tensors[needed[0]])[0])}
  if model_name.startswith("vgg"):
    options["hidden"] = int(np.shape(tensors["classifier.0.weight"])[0])
  return options


def _vit_options(model_name: str, tensors: Mapping[str, Any]) -> dict[str, int]:
  """``vit``'s patch size, width, depth and MLP size from its tensors (its head count cannot be
  read from weights: the default 12, or pass ``heads``); ``vit_b16`` fixes them all."""
  if all(name.startswith("1.") for name in tensors):
    tensors = {name[2:]: value for name, value in tensors.items()}
  if model_name == "vit_b16":
    return {}
  if "conv_proj.weight" not in tensors or "encoder.layers.encoder_layer_0.mlp.0.weight" not in tensors:
    raise ValueError(f"state dict has no conv_proj.weight or encoder layers to read {model_name}'s "
                     "size from; is it a torchvision VisionTransformer checkpoint?")
  patches = np.shape(tensors["conv_proj.weight"])
  depth = len({name.split(".")[2] for name in tensors if name.startswith("encoder.layers.")})
  return {"width": int(patches[0]), "patch_size": int(patches[-1]), "depth": depth,
          "mlp_dim": int(np.shape(tensors["encoder.layers.encoder_layer_0.mlp.0.weight"])[0])}


def to_torch_state_dict(model_name: str, variables: Variables,
                        **model_options: Any) -> dict[str, np.ndarray]:
  """The PyTorch state dict (name → float32 numpy array, plus int64 ``num_batches_tracked``) of
  d3jax ``variables`` of ``model_name``, loadable with ``load_state_dict`` into BackdoorBench's
  architecture (module docstring). ``model_options`` are those the model was built with (only
  ``small_input`` changes the conversion).

  Raises:
    ValueError: an unknown model name, or variables that are not this model's.
  """
  get_model(model_name, 2, **model_options)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  leaves = _leaves(model_name, flax.traverse_util.unflatten_dict(flat), model_options)
  state = {leaf.torch_name: np.array(
      leaf.to_torch(np.asarray(flat[(leaf.collection, *leaf.path)], np.float32)))
      for leaf in leaves}
  for counter in _bn_counters(leaves):
    state[counter] = np.zeros((), np.int64)
  return state


def _strip_prefix(name: str) -> str:
  return name[len("module."):] if name.startswith("module.") else name


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy array, a jax array or a (CPU/GPU) torch tensor."""
  if hasattr(value, "detach"):  # a torch tensor; torch itself is never imported here
    value = value.detach().cpu().numpy()
  return np.asarray(value)
