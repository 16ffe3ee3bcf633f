"""Checkpoint files of the PyTorch ecosystem: ``torch.save`` archives and ``.safetensors``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from d3jax.interop.safetensors_format import load_safetensors, save_safetensors
from d3jax.interop.torch_pickle import load_torch_zip

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def load_torch_checkpoint(path: str | Path) -> Any:
  """The object stored in a PyTorch checkpoint, tensors as numpy arrays, no code executed.

  ``.safetensors`` files are read by their header; anything else as a ``torch.save`` zip archive
  through an allow-list unpickler (tensors, numpy arrays, dicts, lists, tuples, numbers, strings;
  :mod:`d3jax.interop.torch_pickle`), the same guarantee as ``torch.load(weights_only=True)``.
  PyTorch need not be installed.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle needs a global outside the allow-list (nothing executed).
    ValueError: a truncated or malformed file.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no checkpoint file at {path}.")
  if path.suffix == ".safetensors":
    return load_safetensors(path)
  return load_torch_zip(path)


def save_torch_state_dict(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> Path:
  """Writes a state dict of numpy arrays as ``.safetensors`` (numpy only) or, for any other
  suffix, with ``torch.save`` (which needs PyTorch: ``pip install 'd3jax[torch]'``).

  Raises:
    ValueError: a suffix outside :data:`SUFFIXES`, or a ``.pt`` file without PyTorch installed.
  """
  path = Path(path)
  if path.suffix not in SUFFIXES:
    raise ValueError(f"{path}: the suffix must be one of {', '.join(SUFFIXES)}, got "
                     f"{path.suffix or 'none'}.")
  if path.suffix == ".safetensors":
    save_safetensors(path, state_dict)
    return path
  try:
    import torch  # optional: only writing .pt needs it
  except ImportError:
    raise ValueError(f"{path}: writing {path.suffix} files needs PyTorch (pip install "
                     "'d3jax[torch]'); a .safetensors file does not.") from None
  torch.save({name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()},
             path)
  return path
