"""Static pixel-space triggers: BadNets, Blended, SIG and additive patterns (LF, TrojanNN).

A trigger maps a uint8 NHWC batch (numpy or jax) and an optional jax key to a uint8 batch of
the same shape. It runs in pixel space, before normalization and augmentation, and is jittable:
shapes are checked at trace time and the arithmetic is ``jnp``. Static triggers ignore the key.
As in BackdoorBench, every float result is clipped to [0, 255] and truncated toward zero to
uint8, so poisoned images are quantized before normalization and augmentation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

ImageShape = tuple[int, int, int]
LABEL_MODES = ("all2one", "all2all", "clean_label", "untargeted")


class Trigger(Protocol):
  """What :func:`d3jax.attacks.poison` needs from a trigger.

  ``label_modes`` lists the label modes the attack is defined for (see
  :data:`d3jax.attacks.LABEL_MODES`); the first is its default.
  """

  name: str
  label_modes: tuple[str, ...]

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
  """A solid square patch in the bottom-right corner, touching the border (BackdoorBench's ``resource/badnet/trigger_image.png``).

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
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES

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
  """Alpha blending with a key image K: ``trunc(clip((1 − α)·x + α·K, 0, 255))`` (Chen et al. 2017).

  Computed in float32 with K kept float (not re-quantized), then truncated to uint8 (values are
  non-negative, so truncation equals floor).

  The paper's Hello Kitty key cannot be shipped, so the default K is uniform noise in [0, 255]
  of shape (H, W, C) drawn with ``jax.random`` from ``seed`` (Chen et al. 2017 also blended a
  random-noise pattern). ``key_image`` may be an array (H', W'[, 1 or 3]), uint8 or float in
  0..255, or a path to an image file (read with PIL, else matplotlib). It is resized to (H, W)
  with ``jax.image.resize(..., "linear", antialias=True)``, which is not bit-matched to
  BackdoorBench's PIL bilinear resize; ship a pre-resized array for exactness.
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
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
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


@dataclasses.dataclass(frozen=True)
class SIG:
  """A horizontal sinusoid added to every row: Barni, Kallas & Tondi, "A new backdoor attack in
  CNNs by training set corruption without label poisoning", ICIP 2019 (the ramp-free "sinusoidal
  signal" of their Sec. 3).

  ``out[i, j, c] = trunc(clip(x[i, j, c] + Δ·sin(2π·j·f / W), 0, 255))`` for column j of W,
  the same for every row and channel (vertical stripes). BackdoorBench uses Δ = 40, f = 6 and
  poisons only target-class training images (clean-label).

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    delta: amplitude Δ in pixel values.
    frequency: f, periods across the image width.
    pattern: the float32 pattern (H, W, C) (derived, not an argument).
  """

  image_shape: ImageShape
  delta: float = 40.0
  frequency: float = 6.0
  name: ClassVar[str] = "sig"
  label_modes: ClassVar[tuple[str, ...]] = ("clean_label",)
  pattern: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    shape = _image_shape(self.image_shape)
    object.__setattr__(self, "image_shape", shape)
    if not 0.0 <= float(self.delta) <= 255.0:
      raise ValueError(f"SIG delta must lie in [0, 255] pixel values, got {self.delta}.")
    if float(self.frequency) < 0.0:
      raise ValueError(f"SIG frequency must be non-negative, got {self.frequency}.")
    object.__setattr__(self, "delta", float(self.delta))
    object.__setattr__(self, "frequency", float(self.frequency))
    height, width, channels = shape
    columns = np.arange(width, dtype=np.float64)
    row = self.delta * np.sin(2.0 * np.pi * columns * self.frequency / width)
    pattern = np.broadcast_to(row[None, :, None], (height, width, channels))
    object.__setattr__(self, "pattern", pattern.astype(np.float32))

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns the uint8 batch with the sinusoid added; ``key`` is ignored (static trigger)."""
    del key
    images = _check_batch(images, self.image_shape, "SIG")
    return add_pattern(images, self.pattern)


@dataclasses.dataclass(frozen=True, eq=False)
class Additive:
  """A fixed pattern P added in pixel space: ``trunc(clip(x + P, 0, 255))``.

  The trigger of LF (a low-frequency universal perturbation) and TrojanNN (a masked trigger
  optimised against a clean model); :mod:`d3jax.attacks.lf` and :mod:`d3jax.attacks.trojannn`
  build the pattern. With ``wrap=True`` the sum is taken modulo 256 instead of clipped, as
  BackdoorBench's TrojanNN does by casting to uint8 before clipping (300 becomes 44).

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    pattern: float pattern in pixel units, shape (H, W, C) (or (H, W, 1) broadcast to C).
    wrap: add modulo 256 (uint8 overflow) instead of clipping; needs an integer pattern in
      [0, 255].
    name: the attack's registry name.
    label_modes: the label modes the attack is defined for.
  """

  image_shape: ImageShape
  pattern: np.ndarray = dataclasses.field(repr=False)
  wrap: bool = False
  name: str = "additive"
  label_modes: tuple[str, ...] = LABEL_MODES

  def __post_init__(self) -> None:
    shape = _image_shape(self.image_shape)
    object.__setattr__(self, "image_shape", shape)
    pattern = np.asarray(self.pattern, np.float32)
    if pattern.ndim != 3 or pattern.shape[:2] != shape[:2] or pattern.shape[2] not in (1, shape[2]):
      raise ValueError(
          f"{self.name} pattern must have shape {shape} (or {shape[:2] + (1,)}) to match the "
          f"images, got {pattern.shape}.")
    if not np.all(np.isfinite(pattern)):
      raise ValueError(f"{self.name} pattern must be finite.")
    if self.wrap and (pattern.min() < 0 or pattern.max() > 255 or np.any(pattern != np.round(pattern))):
      raise ValueError(
          f"{self.name} with wrap=True needs an integer pattern in [0, 255] (a uint8 image), got "
          f"values in [{pattern.min()}, {pattern.max()}].")
    object.__setattr__(self, "pattern", np.broadcast_to(pattern, shape).astype(np.float32))

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns the uint8 batch with the pattern added; ``key`` is ignored (static trigger)."""
    del key
    images = _check_batch(images, self.image_shape, self.name)
    if self.wrap:
      return ((images.astype(jnp.int32) + self.pattern.astype(np.int32)) % 256).astype(jnp.uint8)
    return add_pattern(images, self.pattern)


def add_pattern(images: jax.Array, pattern: Any) -> jax.Array:
  """``trunc(clip(x + pattern, 0, 255))`` as uint8, computed in float32."""
  summed = images.astype(jnp.float32) + jnp.asarray(pattern, jnp.float32)
  return jnp.clip(summed, 0.0, 255.0).astype(jnp.uint8)


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
