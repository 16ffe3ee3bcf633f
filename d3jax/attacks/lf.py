"""LF, the low-frequency attack: Zeng, Park, Mohammad & Jia, "Rethinking the backdoor attacks'
triggers: a frequency perspective", ICCV 2021.

The trigger is a universal adversarial perturbation toward the target class (Moosavi-Dezfooli et
al., "Universal adversarial perturbations", CVPR 2017, Algorithm 1) whose every update is passed
through a Gaussian low-pass filter, so it has no high-frequency artifacts. It is added in pixel
space like any additive trigger. Generation, as BackdoorBench's ``resource/lowFrequency`` script
does it: on [0, 1] images and a clean model, for each crafting image not yet sent to the target,
a targeted DeepFool perturbation r (Moosavi-Dezfooli et al., "DeepFool", CVPR 2016, Sec. 3,
linearising the margin to the target class, with overshoot) is low-pass filtered and added to
the universal perturbation v, v is filtered again and min-max rescaled to [0, magnitude]. Passes
over the crafting images repeat until the fooling rate (the share of held-out non-target images
classified as the target with v added) reaches ``fooling_rate``, for at most ``max_passes``
passes, or until the last five rates differ by less than 0.01.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from d3jax.attacks.clean import CleanModel, unit
from d3jax.attacks.triggers import LABEL_MODES, Additive, ImageShape, _image_shape

_PLATEAU_PASSES = 5
_PLATEAU_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class LFConfig:
  """LF (Zeng et al., ICCV 2021) with BackdoorBench's generation settings.

  Deviations from BackdoorBench: the fooling rate is measured on ``eval_per_class`` held-out
  images of each non-target class drawn from the attacker's clean training data (BackdoorBench
  uses test images of every class); the 30-tap filter's half-pixel offset is resolved by padding
  14 pixels before and 15 after; the pattern is ``trunc(255·v)`` as a uint8 image, which is the
  form of BackdoorBench's shipped ``resource/lowFrequency/*_0_255.npy`` files (its script, as it
  stands, would save ``clip(255·v + 127.5)`` instead).

  Attributes:
    pattern_path: an ``.npy`` pattern in pixel units, (H, W), (H, W, C) or (1, H, W, C)
      (BackdoorBench's files load as they are); empty: generate one against a clean model.
    num_images: crafting images drawn from the clean data.
    eval_per_class: held-out images per non-target class for the fooling rate.
    overshoot: DeepFool's overshoot.
    max_iter: DeepFool iterations per image.
    max_passes: passes over the crafting images.
    fooling_rate: stop once this share of held-out images is sent to the target.
    magnitude: the perturbation's range after rescaling, in [0, 1] units (0.2 = 51 pixel values).
    filter_taps: length of the Gaussian filter.
    filter_sigma: its standard deviation in pixels.
  """

  pattern_path: str = ""
  num_images: int = 100
  eval_per_class: int = 10
  overshoot: float = 0.02
  max_iter: int = 200
  max_passes: int = 50
  fooling_rate: float = 0.2
  magnitude: float = 0.2
  filter_taps: int = 30
  filter_sigma: float = 6.0
  name: ClassVar[str] = "lf"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
  kind: ClassVar[str] = "poison"

  @property
  def crafts_on(self) -> str:
    """A clean ``"model"`` to generate the pattern, or ``"nothing"`` with a pattern file."""
    return "nothing" if self.pattern_path else "model"

  def __post_init__(self) -> None:
    for field in ("num_images", "eval_per_class", "max_iter", "max_passes", "filter_taps"):
      if getattr(self, field) < 1:
        raise ValueError(f"LF {field} must be ≥ 1, got {getattr(self, field)}.")
    for field in ("fooling_rate", "magnitude"):
      if not 0.0 < getattr(self, field) <= 1.0:
        raise ValueError(f"LF {field} must lie in (0, 1], got {getattr(self, field)}.")
    if self.overshoot < 0 or self.filter_sigma <= 0:
      raise ValueError(
          f"LF overshoot must be ≥ 0 and filter_sigma > 0, got {self.overshoot} and {self.filter_sigma}.")

  def trigger(self, image_shape: ImageShape, *, clean: CleanModel | None = None, target: int = 0,
              key: jax.Array | None = None) -> Additive:
    """The LF trigger: the pattern file if given, else a pattern generated against ``clean``."""
    image_shape = _image_shape(image_shape)
    if self.pattern_path:
      pattern = load_pattern(self.pattern_path, image_shape)
    elif clean is None or key is None:
      raise ValueError(
          "LF needs a pattern: set pattern_path to an .npy file, or pass a clean model (clean=...) "
          "and a key to generate one.")
    else:
      pattern, _ = generate_pattern(self, clean.checked(image_shape, "LF"), target, key)
    return Additive(image_shape, pattern, name=self.name, label_modes=self.label_modes)


def gaussian_kernel(taps: int, sigma: float) -> np.ndarray:
  """The 1-D Gaussian ``exp(−(i − (taps − 1)/2)² / (2σ²))``, i = 0..taps−1, normalised to sum 1."""
  offsets = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
  kernel = np.exp(-offsets ** 2 / (2.0 * sigma ** 2))
  return (kernel / kernel.sum()).astype(np.float32)


def filter_matrix(size: int, kernel: np.ndarray) -> np.ndarray:
  """The (size, size) matrix of 1-D filtering with ``kernel`` and zero padding, output aligned
  with the input: ``out[i] = Σ_j kernel[j − i + (taps − 1)//2] · v[j]``."""
  lead = (len(kernel) - 1) // 2
  tap = np.arange(size)[None, :] - np.arange(size)[:, None] + lead
  inside = (tap >= 0) & (tap < len(kernel))
  return np.where(inside, kernel[np.clip(tap, 0, len(kernel) - 1)], 0.0).astype(np.float32)


def low_pass(v: jax.Array, taps: int, sigma: float) -> jax.Array:
  """Separable Gaussian low-pass filter of an (H, W, C) image, per channel, zero padding."""
  kernel = gaussian_kernel(taps, sigma)
  rows, cols = filter_matrix(v.shape[0], kernel), filter_matrix(v.shape[1], kernel)
  return jnp.einsum("ij,jkc,lk->ilc", rows, v, cols)


def load_pattern(path: str, image_shape: ImageShape) -> np.ndarray:
  """Reads an ``.npy`` pattern in pixel units and returns it as float32 (H, W, C)."""
  if not os.path.isfile(path):
    raise ValueError(f"LF pattern_path {path!r} is not a file; pass an existing .npy pattern.")
  pattern = np.load(path, allow_pickle=False)
  if pattern.ndim == 4 and pattern.shape[0] == 1:
    pattern = pattern[0]
  if pattern.ndim == 2:
    pattern = pattern[..., None]
  height, width, channels = image_shape
  if pattern.ndim != 3 or pattern.shape[:2] != (height, width) or pattern.shape[2] not in (1, channels):
    raise ValueError(
        f"LF pattern {path!r} has shape {pattern.shape}; images of shape {image_shape} need "
        f"(H, W), (H, W, {channels}) or (1, H, W, {channels}) with H, W = {height}, {width}.")
  pattern = pattern.astype(np.float32)
  if not np.all(np.isfinite(pattern)) or np.abs(pattern).max() > 255:
    raise ValueError(f"LF pattern {path!r} must hold finite pixel offsets in [-255, 255].")
  if np.abs(pattern).max() <= 1.0 and np.any(pattern):
    raise ValueError(
        f"LF pattern {path!r} lies within [-1, 1], which is a no-op on 0..255 images after "
        "truncation; it is probably in [0, 1] units: multiply it by 255.")
  return np.broadcast_to(pattern, image_shape).copy()


def generate_pattern(config: LFConfig, clean: CleanModel, target: int,
                     key: jax.Array) -> tuple[np.ndarray, list[float]]:
  """Generates the LF pattern against ``clean`` (see the module docstring).

  Returns:
    The uint8 pattern ``trunc(255·v)`` of shape (H, W, C) and the fooling rate after each pass.
  """
  craft, held_out = _draw_images(clean, config, target, key)
  one_pass = jax.jit(lambda v: _universal_pass(config, clean, target, craft, v))
  fooled = jax.jit(lambda v: jnp.mean(_predict(clean, held_out + v) == target))
  v = jnp.zeros(clean.images.shape[1:], jnp.float32)
  rates: list[float] = []
  for _ in range(config.max_passes):
    v = one_pass(v)
    rates.append(float(fooled(v)))
    recent = rates[-_PLATEAU_PASSES:]
    if rates[-1] >= config.fooling_rate or (
        len(recent) == _PLATEAU_PASSES and max(recent) - min(recent) < _PLATEAU_TOLERANCE):
      break
  return np.asarray(jnp.floor(v * 255.0), np.uint8), rates


def _draw_images(clean: CleanModel, config: LFConfig, target: int,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Disjoint draws: ``num_images`` crafting images, ``eval_per_class`` per non-target class."""
  num_classes = clean.num_classes
  if not 0 <= target < num_classes:
    raise ValueError(f"LF target must be a class in [0, {num_classes}), got {target}.")
  order = np.asarray(jax.random.permutation(key, len(clean.images)))
  held_out = np.concatenate([
      order[clean.labels[order] == c][:config.eval_per_class]
      for c in range(num_classes) if c != target])
  craft = order[~np.isin(order, held_out)][:config.num_images]
  if len(craft) < config.num_images or len(held_out) < config.eval_per_class * (num_classes - 1):
    raise ValueError(
        f"LF needs {config.num_images} crafting images plus {config.eval_per_class} held-out "
        f"images of each non-target class, but the clean data has {len(clean.images)} images; "
        "pass more clean images or lower num_images / eval_per_class.")
  return unit(clean.images[craft]), unit(clean.images[held_out])


def _predict(clean: CleanModel, unit_images: jax.Array) -> jax.Array:
  return jnp.argmax(clean.logits(unit_images), axis=-1)


def targeted_deepfool(clean: CleanModel, x: jax.Array, target: int, overshoot: float,
                      max_iter: int) -> tuple[jax.Array, jax.Array]:
  """A targeted DeepFool perturbation of one [0, 1] image (H, W, C).

  While the prediction k at x + (1 + overshoot)·r is not the target t (at most ``max_iter``
  times), the margin f = z_t − z_k is linearised and r grows by (|f| + 1e-4)·∇f / ‖∇f‖².

  Returns:
    The perturbation (1 + overshoot)·r and whether it reaches the target.
  """
  def margin(z, k):
    logits = clean.logits(z[None])[0]
    return logits[target] - logits[k]

  def body(state):
    r, i, _ = state
    z = x + (1.0 + overshoot) * r
    k = _predict(clean, z[None])[0]
    f, w = jax.value_and_grad(margin)(z, k)
    step = (jnp.abs(f) + 1e-4) * w / (jnp.sum(w * w) + 1e-12)
    done = k == target
    return jnp.where(done, r, r + step), i + 1, done

  def cond(state):
    _, i, done = state
    return jnp.logical_and(i < max_iter, jnp.logical_not(done))

  r, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros_like(x), 0, jnp.array(False)))
  perturbation = (1.0 + overshoot) * r
  reached = _predict(clean, (x + perturbation)[None])[0] == target
  return perturbation, reached


def _universal_pass(config: LFConfig, clean: CleanModel, target: int, craft: jax.Array,
                    v: jax.Array) -> jax.Array:
  """One pass over the crafting images, updating the universal perturbation ``v``."""
  def smooth(u):
    return low_pass(u, config.filter_taps, config.filter_sigma)

  def rescale(u):
    low, high = jnp.min(u), jnp.max(u)
    return (u - low) / jnp.maximum(high - low, 1e-12) * config.magnitude

  def update(v, x):
    def accept(v):
      r, reached = targeted_deepfool(clean, x + v, target, config.overshoot, config.max_iter)
      return jnp.where(reached, rescale(smooth(v + smooth(r))), v)

    needs_step = _predict(clean, (x + v)[None])[0] != target
    return jax.lax.cond(needs_step, accept, lambda v: v, v), None

  v, _ = jax.lax.scan(update, v, craft)
  return v
