"""Reads a ``torch.save`` file without PyTorch and without executing pickled code.

A ``torch.save`` file (PyTorch ≥ 1.6, the only format BackdoorBench writes) is a zip archive with
one pickle, ``<root>/data.pkl``, and one raw little-endian buffer per tensor storage,
``<root>/data/<key>``. The pickle names its storages by persistent id
``("storage", <storage class>, key, location, numel)`` and builds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.

:class:`RestrictedUnpickler` resolves only the globals such a file needs — torch's tensor
rebuild functions and storage classes (turned into numpy arrays here), numpy's array
reconstruction, ``collections.OrderedDict`` and a few builtins — and refuses every other global
*before* anything is called, so a pickle whose ``__reduce__`` would run ``os.system`` is rejected
with nothing executed. This is the same allow-list idea as ``torch.load(weights_only=True)``
(which torch ≥ 2.6 uses by default), plus numpy arrays, which BackdoorBench stores.
"""
from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

try:  # numpy >= 2 moved the pickled array helpers to numpy._core
  from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
  from numpy.core import multiarray as _multiarray

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
# torch dtype name (torch.float32 pickles as the global torch.float32) -> numpy dtype.
_TORCH_DTYPES: dict[str, Any] = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class StateDict(dict):
  """What a pickled ``collections.OrderedDict`` becomes: a dict that also takes the attributes
  pickle restores on it (PyTorch state dicts carry ``_metadata``, module versions)."""


_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): StateDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes (numpy arrays)
    ("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
}


class UnsafeCheckpointError(ValueError):
  """A checkpoint needs a pickled global outside the allow-list; nothing was executed."""


class _Storage:
  """A storage class marker: ``dtype`` of its elements."""

  def __init__(self, dtype: Any):
    self.dtype = np.dtype(dtype)


class _TorchDtype:
  def __init__(self, dtype: Any):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v2``: a (copied) strided view of a storage."""
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_tensor_v3(storage: np.ndarray, offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool, hooks: Any,
                       dtype: _TorchDtype, *_: Any) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v3``: an untyped (byte) storage with an explicit dtype."""
  return _rebuild_tensor(storage.view(dtype.dtype), offset, size, stride)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
  """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is its data here."""
  return data


_TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "_rebuild_tensor_v2": _rebuild_tensor, "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` of a torch.save archive; storages come from ``read_storage(key)``."""

  def __init__(self, file: io.BufferedIOBase, read_storage: Callable[[str], bytes], source: str):
    super().__init__(file)
    self._read_storage = read_storage
    self._source = source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _PLAIN_GLOBALS:
      return _PLAIN_GLOBALS[module, name]
    if module == "torch._utils" and name in _TORCH_FUNCTIONS:
      return _TORCH_FUNCTIONS[name]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _Storage(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(_TORCH_DTYPES[name])
    raise UnsafeCheckpointError(
        f"{self._source}: refusing to unpickle {module}.{name}; only tensors, numpy arrays and "
        "plain containers are allowed, and nothing was executed.")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _Storage)):
      raise UnsafeCheckpointError(
          f"{self._source}: unsupported persistent id {pid!r:.80}; expected a torch storage.")
    storage_class, key = pid[1], str(pid[2])
    if key not in self._storages:
      self._storages[key] = np.frombuffer(self._read_storage(key), dtype=storage_class.dtype)
    return self._storages[key]


def load_torch_zip(path: Path) -> Any:
  """The object a ``torch.save`` zip archive holds, tensors as numpy arrays (module docstring).

  Raises:
    UnsafeCheckpointError: a pickled global outside the allow-list (nothing is executed).
    ValueError: not a torch.save archive (truncated, legacy pre-1.6 format, another file type).
  """
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(
        f"{path}: not a torch.save archive (truncated, or the legacy pre-1.6 format; re-save it "
        "with a recent PyTorch).") from None
  with archive:
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: a torch.save archive holds one data.pkl, found {len(pickles)}.")
    root = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    if root + "byteorder" in names and archive.read(root + "byteorder").strip() != b"little":
      raise ValueError(f"{path}: big-endian torch archives are not supported.")

    def read_storage(key: str) -> bytes:
      try:
        return archive.read(f"{root}data/{key}")
      except KeyError:
        raise ValueError(f"{path}: storage {key} is missing from the archive (truncated?).") from None

    try:
      with archive.open(pickles[0]) as file:
        return RestrictedUnpickler(file, read_storage, str(path)).load()
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
      raise ValueError(f"{path}: unreadable torch.save archive ({error}).") from None
