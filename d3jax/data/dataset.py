"""The dataset contract of DESIGN.md: uint8 NHWC arrays plus class count and normalization.

Every source (embedded, npz, tfds) returns a :class:`Dataset`; every consumer (attacks,
defenses, metrics) reads one. Validation happens once, here, with errors that say what to do.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image dataset held in host memory.

  Attributes:
    x_train, x_test: uint8 images, shape (N, H, W, C), values 0..255 (pixel space).
    y_train, y_test: int32 labels in [0, num_classes).
    num_classes: number of classes C.
    mean, std: per-channel normalization constants in [0, 1] space (torchvision Normalize); models see
      ``(x / 255 - mean) / std``.
    name: a short identifier used in logs and run directories.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str = "dataset"

  def __post_init__(self) -> None:
    for split in ("train", "test"):
      x = getattr(self, f"x_{split}")
      y = getattr(self, f"y_{split}")
      validate_images(x, f"x_{split}")
      object.__setattr__(self, f"y_{split}", validate_labels(y, self.num_classes, len(x), f"y_{split}"))
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"x_train images have shape {self.x_train.shape[1:]} but x_test images have "
          f"{self.x_test.shape[1:]}; both splits must share (H, W, C).")
    channels = self.x_train.shape[-1]
    for field in ("mean", "std"):
      value = tuple(float(v) for v in getattr(self, field))
      if len(value) != channels:
        raise ValueError(
            f"{field} has {len(value)} entries but the images have {channels} channels; "
            "give one normalization constant per channel.")
      object.__setattr__(self, field, value)
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std}.")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

  def replace(self, **changes) -> "Dataset":
    return dataclasses.replace(self, **changes)


def validate_images(x: np.ndarray, what: str = "images") -> None:
  """Raises ValueError unless ``x`` is a uint8 array of shape (N, H, W, C) with C in {1, 3}."""
  if not isinstance(x, np.ndarray):
    raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}.")
  if x.dtype != np.uint8:
    raise ValueError(
        f"{what} must be uint8 pixel values 0..255 (NHWC), got dtype {x.dtype}; convert with "
        "np.clip(x, 0, 255).astype(np.uint8) (multiply by 255 first if your images are in [0, 1]).")
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
        f"{what} must have shape (N, H, W, C) with C = 1 or 3, got {x.shape}; add a channel axis "
        "with x[..., None] for grayscale, or transpose NCHW with x.transpose(0, 2, 3, 1).")
  if len(x) == 0:
    raise ValueError(f"{what} is empty.")


def validate_labels(y: np.ndarray, num_classes: int, n: int, what: str = "labels") -> np.ndarray:
  """Returns ``y`` as int32 after checking its shape and range; raises ValueError otherwise."""
  y = np.asarray(y)
  if y.shape != (n,):
    raise ValueError(f"{what} must have shape ({n},) to match its images, got {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be integer class indices, got dtype {y.dtype}.")
  if n and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"{what} must lie in [0, {num_classes}), found values in [{y.min()}, {y.max()}]; "
        "check num_classes or remap the labels.")
  return y.astype(np.int32)


def as_tuple(values: float | Sequence[float], channels: int) -> tuple[float, ...]:
  """Broadcasts a scalar normalization constant to ``channels`` entries."""
  if np.isscalar(values):
    return (float(values),) * channels
  return tuple(float(v) for v in values)  # type: ignore[union-attr]
