"""Image warping for WaNet: Nguyen & Tran, "WaNet — imperceptible warping-based backdoor attack",
ICLR 2021 (Sec. 3.2, Eqs. 3–5).

A fixed warping field is drawn once: k×k control offsets uniform in [−1, 1], divided by their
mean absolute value, upsampled to H×W by bicubic interpolation with aligned corners (Keys'
kernel with a = −0.75, as PyTorch's ``interpolate``). With the identity sampling grid in [−1, 1]
(x = column, y = row), the backdoor grid is ``clip((identity + s·field / H)·rescale, −1, 1)``
and images are resampled bilinearly at it with aligned corners and zero padding (PyTorch's
``grid_sample(..., align_corners=True)``). Offsets are kept relative to the identity, so s = 0
with rescale 1 samples every pixel exactly at itself.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from d3jax.attacks.triggers import ImageShape, _check_batch, _image_shape

_CUBIC_A = -0.75


def _cubic_weight(distance: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = −0.75 at |distance| < 2."""
  d = np.abs(distance)
  near = ((_CUBIC_A + 2) * d - (_CUBIC_A + 3)) * d * d + 1
  far = ((_CUBIC_A * d - 5 * _CUBIC_A) * d + 8 * _CUBIC_A) * d - 4 * _CUBIC_A
  return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
  """The (out_size, in_size) matrix of 1-D bicubic upsampling with aligned corners; taps beyond
  the border are clamped to it, as in PyTorch."""
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  source = np.arange(out_size) * scale
  base = np.floor(source).astype(int)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(-1, 3):
    index = np.clip(base + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), _cubic_weight(source - (base + tap)))
  return matrix.astype(np.float32)


def warp_field(key: jax.Array, k: int, height: int, width: int) -> jax.Array:
  """The normalised, upsampled random field (H, W, 2): channel 0 moves x (columns), 1 moves y."""
  noise = jax.random.uniform(key, (k, k, 2), jnp.float32, -1.0, 1.0)
  noise = noise / jnp.mean(jnp.abs(noise))
  return jnp.einsum("ij,jkc,lk->ilc", bicubic_matrix(height, k), noise, bicubic_matrix(width, k))


def identity_grid(height: int, width: int) -> jax.Array:
  """Sampling coordinates in [−1, 1] (H, W, 2), x (column) first, as ``grid_sample`` reads them."""
  ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij")
  return jnp.stack([xs, ys], axis=-1)


def grid_offsets(field: jax.Array, strength: float, rescale: float) -> jax.Array:
  """Offsets of the backdoor grid from the identity, in [−1, 1] units: (id + s·field/H)·r − id."""
  identity = identity_grid(field.shape[0], field.shape[1])
  return (identity + strength * field / field.shape[0]) * rescale - identity


def warp(images: jax.Array, offsets: jax.Array) -> jax.Array:
  """Bilinear resampling of float images (B, H, W, C) at identity + ``offsets`` (clipped to
  [−1, 1]); ``offsets`` is (H, W, 2) or per sample (B, H, W, 2). Aligned corners, zero padding."""
  _, height, width, _ = images.shape
  offsets = jnp.broadcast_to(offsets, (images.shape[0], height, width, 2))
  cols = jnp.clip(jnp.arange(width) + offsets[..., 0] * (width - 1) / 2.0, 0.0, width - 1.0)
  rows = jnp.clip(jnp.arange(height)[:, None] + offsets[..., 1] * (height - 1) / 2.0, 0.0, height - 1.0)
  col0, row0 = jnp.floor(cols), jnp.floor(rows)
  dx, dy = cols - col0, rows - row0

  def tap(image, row, col):
    valid = (row < height) & (col < width)
    value = image[jnp.minimum(row, height - 1), jnp.minimum(col, width - 1)]
    return jnp.where(valid[..., None], value, 0.0)

  def sample(image, row0, col0, dy, dx):
    row0, col0 = row0.astype(jnp.int32), col0.astype(jnp.int32)
    dy, dx = dy[..., None], dx[..., None]
    top = tap(image, row0, col0) * (1 - dx) + tap(image, row0, col0 + 1) * dx
    bottom = tap(image, row0 + 1, col0) * (1 - dx) + tap(image, row0 + 1, col0 + 1) * dx
    return top * (1 - dy) + bottom * dy

  return jax.vmap(sample)(images, row0, col0, dy, dx)


@dataclasses.dataclass(frozen=True, eq=False)
class Warp:
  """WaNet's warp as a pixel-space trigger on uint8 images (the backdoor test set, the gallery).

  Deviation: the warped values are rounded to the nearest integer, where BackdoorBench truncates
  its denormalized floats (which turns an exactly reproduced 100 into 99 after float error).

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    offsets: the backdoor grid's offsets from the identity, (H, W, 2), from :func:`grid_offsets`.
  """

  image_shape: ImageShape
  offsets: Any = dataclasses.field(repr=False)
  name: ClassVar[str] = "wanet"
  label_modes: ClassVar[tuple[str, ...]] = ("all2one", "all2all")

  def __post_init__(self) -> None:
    shape = _image_shape(self.image_shape)
    object.__setattr__(self, "image_shape", shape)
    offsets = np.asarray(self.offsets, np.float32)
    if offsets.shape != shape[:2] + (2,):
      raise ValueError(f"WaNet offsets must have shape {shape[:2] + (2,)}, got {offsets.shape}.")
    object.__setattr__(self, "offsets", offsets)

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns the warped uint8 batch; ``key`` is ignored (the field is fixed)."""
    del key
    images = _check_batch(images, self.image_shape, "WaNet")
    warped = warp(images.astype(jnp.float32), self.offsets)
    return jnp.clip(jnp.round(warped), 0.0, 255.0).astype(jnp.uint8)
