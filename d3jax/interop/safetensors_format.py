"""Reads and writes ``.safetensors`` files (Hugging Face's format) with numpy only.

Layout: an 8-byte little-endian header length n, an n-byte JSON header
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the concatenated little-endian, C-ordered tensor bytes. Nothing in the file is executed.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file, by name.

  Raises:
    ValueError: a truncated file, a malformed header or an unsupported dtype.
  """
  data = Path(path).read_bytes()
  if len(data) < 8:
    raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
  (length,) = struct.unpack("<Q", data[:8])
  if 8 + length > len(data):
    raise ValueError(f"{path}: truncated safetensors file (header of {length} bytes, file of "
                     f"{len(data)}).")
  try:
    header = json.loads(data[8:8 + length])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ValueError(f"{path}: malformed safetensors header.") from None
  body = memoryview(data)[8 + length:]
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}; supported: "
                       f"{', '.join(_DTYPES)}.")
    begin, end = entry["data_offsets"]
    if end > len(body):
      raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated?).")
    array = np.frombuffer(body[begin:end], dtype=_DTYPES[entry["dtype"]])
    tensors[name] = array.reshape(entry["shape"]).copy()
  return tensors


def save_safetensors(path: Path, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` (numpy arrays, dtypes of :data:`_DTYPES`) to ``path``."""
  header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
  chunks, offset = [], 0
  for name, value in tensors.items():
    array = np.ascontiguousarray(value)
    if array.dtype not in _CODES:
      raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors.")
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
  Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
