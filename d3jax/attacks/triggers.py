"""Static pixel-space triggers (spec §2.0–§2.2).

A trigger maps a uint8 NHWC batch (numpy or jax) and an optional jax key to a uint8 batch of
the same shape. It runs in pixel space, before normalization and augmentation, and is jittable:
shapes are checked at trace time and the arithmetic is ``jnp``. Static triggers ignore the key.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

ImageShape = tuple[int, int, int]


class Trigger(Protocol):
  """What :func:`d3jax.attacks.poison` needs from a trigger."""

  name: str

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    ...


def _image_shape(shape: Any) -> ImageShape:
  """Validates an (H, W, C) image shape with C in {1, 3} and returns it as a tuple."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1 or shape[-1] not in (1, 3):
    raise ValueError(f"image_shape must be (H, W, C) with C = 1 or 3, got {shape}.")
  return shape  # type: ignore[return-value]


def _check_batch(images: Any, image_shape: ImageShape, name: str) -> jax.Array:
  """Returns ``images`` as a jax uint8 array after checking it is an (N, H, W, C) batch."""
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(
        f"{name} trigger expects uint8 pixel values 0..255, got dtype {images.dtype}.")
  if images.ndim != 4 or images.shape[1:] != image_shape:
    raise ValueError(
        f"{name} trigger was built for images of shape {image_shape} but got a batch of shape "
        f"{images.shape}; pass (N, H, W, C) images or rebuild the trigger with "
        f"image_shape={tuple(images.shape[1:])}.")
  return images


@dataclasses.dataclass(frozen=True)
class BadNets:
  """A solid square patch in the bottom-right corner, touching the border (spec §2.1).

  For 32×32 images the patch is the reference 3×3 square at rows/cols 29–31. For other sizes
  the side is ``max(1, round(3 * min(H, W) / 32))`` with Python's ``round`` (28 → 3, 16 → 2,
  64 → 6) unless ``size`` is given. BackdoorBench instead PIL-resizes its 32×32 trigger PNG,
  which gives a 7×7 soft grey frame at 64×64 and a broken 3-channel trigger on MNIST; neither
  is reproduced. Every channel inside the patch is set to ``value``; pixels outside are kept.

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    size: side of the square in pixels; ``None`` scales 3 px per 32 px of image side.
    value: the pixel value written inside the patch, 0..255.
  """

  image_shape: ImageShape
  size: int | None = None
  value: int = 255
  name: ClassVar[str] = "badnets"

  def __post_init__(self) -> None:
    shape = _image_shape(self.image_shape)
    object.__setattr__(self, "image_shape", shape)
    side = max(1, round(3 * min(shape[:2]) / 32)) if self.size is None else int(self.size)
    if not 1 <= side <= min(shape[:2]):
      raise ValueError(f"BadNets size must lie in [1, {min(shape[:2])}] for {shape}, got {side}.")
    object.__setattr__(self, "size", side)
    if not 0 <= int(self.value) <= 255:
      raise ValueError(f"BadNets value must be a pixel value in [0, 255], got {self.value}.")
    object.__setattr__(self, "value", int(self.value))

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns ``images`` with the patch pasted; ``key`` is ignored (static trigger)."""
    del key
    images = _check_batch(images, self.image_shape, "BadNets")
    return images.at[:, -self.size:, -self.size:, :].set(jnp.uint8(self.value))


@dataclasses.dataclass(frozen=True, eq=False)
class Blended:
  """Alpha blending with a key image K: ``trunc(clip((1 − α)·x + α·K, 0, 255))`` (spec §2.2).

  Computed in float32 with K kept float (not re-quantized), then truncated to uint8 (values are
  non-negative, so truncation equals floor).

  The paper's Hello Kitty key cannot be shipped, so the default K is uniform noise in [0, 255]
  of shape (H, W, C) drawn with ``jax.random`` from ``seed`` (Chen et al. 2017 also blended a
  random-noise pattern). ``key_image`` may be an array (H', W'[, 1 or 3]), uint8 or float in
  0..255, or a path to an image file (read with PIL, else matplotlib). It is resized to (H, W)
  with ``jax.image.resize(..., "linear", antialias=True)``, which is not bit-matched to
  BackdoorBench's PIL bilinear resize (spec §8.11); ship a pre-resized array for exactness.
  Gray keys are repeated to RGB; RGB keys on gray images use ITU-R 601 luma (as PIL's "L").

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    alpha: blend weight of the key image, in [0, 1].
    key_image: ``None`` (seeded noise), an array, or an image file path.
    seed: seed of the default noise pattern.
    pattern: the resolved float32 key image K, shape (H, W, C) (derived, not an argument).
  """

  image_shape: ImageShape
  alpha: float = 0.2
  key_image: Any = dataclasses.field(default=None, repr=False)
  seed: int = 0
  name: ClassVar[str] = "blended"
  pattern: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self) -> None:
    shape = _image_shape(self.image_shape)
    object.__setattr__(self, "image_shape", shape)
    if not 0.0 <= float(self.alpha) <= 1.0:
      raise ValueError(f"Blended alpha must lie in [0, 1], got {self.alpha}.")
    object.__setattr__(self, "alpha", float(self.alpha))
    if self.key_image is None:
      pattern = jax.random.uniform(
          jax.random.key(self.seed), shape, jnp.float32, minval=0.0, maxval=255.0)
    else:
      pattern = _fit_key_image(_as_key_array(self.key_image), shape)
    object.__setattr__(self, "pattern", np.asarray(pattern, np.float32))

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns the blended uint8 batch; ``key`` is ignored (static trigger)."""
    del key
    images = _check_batch(images, self.image_shape, "Blended")
    blended = (1.0 - self.alpha) * images.astype(jnp.float32) + self.alpha * self.pattern
    return jnp.clip(blended, 0.0, 255.0).astype(jnp.uint8)


def _as_key_array(key_image: Any) -> np.ndarray:
  """Reads a key image (array or file path) into a float32 (H', W', C') array, C' in {1, 3}."""
  if isinstance(key_image, (str, os.PathLike)):
    key_image = _read_image(os.fspath(key_image))
  array = np.asarray(key_image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3) or min(array.shape) < 1:
    raise ValueError(
        f"Blended key_image must have shape (H, W), (H, W, 1) or (H, W, 3), got {array.shape}.")
  array = array.astype(np.float32)
  if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 255:
    raise ValueError(
        "Blended key_image must hold pixel values in [0, 255] (multiply by 255 if it is in "
        f"[0, 1]); found range [{np.nanmin(array)}, {np.nanmax(array)}].")
  return array


def _read_image(path: str) -> np.ndarray:
  """Reads an image file as 0..255 values, dropping any alpha channel."""
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(path) as image:
      return np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "F") else "RGB"))
  except ImportError:
    pass
  try:
    from matplotlib import image as mpimg  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading the Blended key image {path!r} needs Pillow or matplotlib; install one "
        "(pip install pillow) or pass the image as an array.") from e
  array = np.asarray(mpimg.imread(path))
  if array.dtype.kind == "f":  # matplotlib returns PNGs as floats in [0, 1].
    array = array * 255.0
  return array[..., :3] if array.ndim == 3 else array


def _fit_key_image(array: np.ndarray, shape: ImageShape) -> jax.Array:
  """Resizes a key image to (H, W) and converts its channels to C."""
  height, width, channels = shape
  if array.shape[-1] == 3 and channels == 1:
    array = array @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
  resized = jax.image.resize(
      jnp.asarray(array), (height, width, array.shape[-1]), "linear", antialias=True)
  return jnp.broadcast_to(resized, shape)


_TRIGGERS = {"badnets": BadNets, "blended": Blended}


def get_trigger(name: str, image_shape: ImageShape, **options: Any) -> Trigger:
  """Builds a trigger by name ("badnets", "blended"); ``options`` go to its constructor."""
  if name.lower() not in _TRIGGERS:
    raise ValueError(f"Unknown trigger {name!r}; available: {', '.join(sorted(_TRIGGERS))}.")
  return _TRIGGERS[name.lower()](image_shape, **options)
