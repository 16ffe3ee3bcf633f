"""TrojanNN: Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning attack on neural networks",
NDSS 2018 (Sec. IV "Trojan trigger generation").

A trigger confined to a mask is optimised so that selected neurons of a clean model fire
strongly: the neurons are the inputs of a layer with the largest total absolute weight to the
layer's outputs (the paper's "strongest connections"), and the trigger minimises
Σ (neuron − target value)² by signed gradient descent, projected to ±ε around the initial mask
image and to [0, 1], stopping early once the cost is below a tolerance. The trigger is then
added to images in pixel space (:class:`d3jax.attacks.triggers.Additive`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.attacks.clean import CleanModel
from d3jax.attacks.triggers import (LABEL_MODES, Additive, ImageShape, _fit_key_image,
                                    _image_shape, _read_image)

# Bounding box of BackdoorBench's apple4.png mask (224×224: rows 120–203, columns 128–194), as
# fractions of the image side; the procedural mask is the ellipse inscribed in it.
_APPLE_ROWS = (120 / 224, 204 / 224)
_APPLE_COLS = (128 / 224, 195 / 224)


@dataclasses.dataclass(frozen=True)
class TrojanNNConfig:
  """TrojanNN (Liu et al., NDSS 2018) with BackdoorBench's PreAct-ResNet18 settings.

  Deviations from BackdoorBench: neurons are chosen from the clean model's own trained head
  (BackdoorBench loads the clean weights into a 1000-class copy, so its head, and hence its
  neuron choice, is random); the trigger is normalized like every model input before the
  forward pass (BackdoorBench feeds raw [0, 1] values); the default mask is a procedural ellipse
  inscribed in the bounding box of BackdoorBench's ``apple4.png``, which is not shipped; the
  trigger is added with clipping, not with BackdoorBench's uint8 wrap-around, unless ``wrap``.

  Attributes:
    mask_path: an image file whose non-zero pixels (after resizing to H×W) form the mask and
      whose values in [0, 1] start the optimisation; empty: the procedural ellipse, value 1.
    layer: name of the top-level Dense module whose inputs are the driven neurons.
    num_neurons: how many neurons to drive.
    target_value: the activation each selected neuron is driven toward.
    steps: at most this many signed-gradient steps.
    step_size: the step size in [0, 1] units.
    epsilon: projection radius around the initial mask image.
    tolerance: stop once the cost falls below this.
    wrap: add the trigger modulo 256, as BackdoorBench's uint8 cast does.
  """

  mask_path: str = ""
  layer: str = "linear"
  num_neurons: int = 2
  target_value: float = 100.0
  steps: int = 1000
  step_size: float = 0.1
  epsilon: float = 0.3
  tolerance: float = 1e-3
  wrap: bool = False
  name: ClassVar[str] = "trojannn"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
  kind: ClassVar[str] = "poison"
  crafts_on: ClassVar[str] = "model"

  def __post_init__(self) -> None:
    if self.num_neurons < 1 or self.steps < 0:
      raise ValueError(
          f"TrojanNN num_neurons must be ≥ 1 and steps ≥ 0, got {self.num_neurons} and {self.steps}.")
    if self.step_size <= 0 or self.epsilon < 0 or self.tolerance < 0:
      raise ValueError(
          "TrojanNN step_size must be > 0 and epsilon, tolerance ≥ 0, got "
          f"{self.step_size}, {self.epsilon}, {self.tolerance}.")

  def trigger(self, image_shape: ImageShape, *, clean: CleanModel | None = None, target: int = 0,
              key: jax.Array | None = None) -> Additive:
    """The TrojanNN trigger optimised against ``clean`` (target and key are not used)."""
    del target, key
    image_shape = _image_shape(image_shape)
    if clean is None:
      raise ValueError("TrojanNN optimises its trigger against a clean model: pass clean=CleanModel(...).")
    pattern, _ = optimise_trigger(self, clean.checked(image_shape, "TrojanNN"), mask_image(self, image_shape))
    return Additive(image_shape, pattern, wrap=self.wrap, name=self.name, label_modes=self.label_modes)


def mask_image(config: TrojanNNConfig, image_shape: ImageShape) -> np.ndarray:
  """The starting trigger in [0, 1], shape (H, W, C); the mask is where it is non-zero."""
  height, width, channels = image_shape
  if not config.mask_path:
    rows = (np.arange(height) + 0.5) / height
    cols = (np.arange(width) + 0.5) / width
    centre = [(a + b) / 2 for a, b in (_APPLE_ROWS, _APPLE_COLS)]
    radius = [(b - a) / 2 for a, b in (_APPLE_ROWS, _APPLE_COLS)]
    inside = (((rows[:, None] - centre[0]) / radius[0]) ** 2
              + ((cols[None, :] - centre[1]) / radius[1]) ** 2) <= 1.0
    return np.repeat(inside[..., None], channels, axis=-1).astype(np.float32)
  if not os.path.isfile(config.mask_path):
    raise ValueError(f"TrojanNN mask_path {config.mask_path!r} is not a file; pass an image file.")
  image = np.asarray(_read_image(config.mask_path), np.float32)
  if image.ndim == 2:
    image = image[..., None]
  mask = np.asarray(_fit_key_image(image, image_shape)) / 255.0
  if not np.any(mask > 0):
    raise ValueError(
        f"TrojanNN mask {config.mask_path!r} has no non-zero pixel at {height}×{width}; "
        "use an image with a visible (non-black) mask region.")
  return np.clip(mask, 0.0, 1.0).astype(np.float32)


def layer_input(clean: CleanModel, layer: str, unit_images: jax.Array) -> jax.Array:
  """The input of the top-level module ``layer`` of the clean model for [0, 1] images."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.scope.path == (layer,):
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    clean.logits(unit_images)
  if not captured:
    raise ValueError(f"TrojanNN layer {layer!r} is not a top-level module of the clean model.")
  return captured[0]


def select_neurons(config: TrojanNNConfig, clean: CleanModel) -> np.ndarray:
  """The ``num_neurons`` inputs of ``layer`` with the largest Σ_out |kernel[in, out]|."""
  params = clean.variables["params"]
  if config.layer not in params or "kernel" not in params[config.layer]:
    raise ValueError(
        f"TrojanNN layer {config.layer!r} is not a top-level Dense layer of the clean model; "
        f"its top-level parameters are {', '.join(sorted(params))}.")
  strength = np.abs(np.asarray(params[config.layer]["kernel"])).sum(axis=1)
  if config.num_neurons > len(strength):
    raise ValueError(
        f"TrojanNN num_neurons must be at most the {len(strength)} inputs of {config.layer!r}, "
        f"got {config.num_neurons}.")
  return np.argsort(-strength, kind="stable")[:config.num_neurons]


def optimise_trigger(config: TrojanNNConfig, clean: CleanModel,
                     start: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
  """Optimises the trigger from the mask image ``start`` (see the module docstring).

  Returns:
    The uint8 trigger ``trunc(255·x)`` (zero outside the mask) and a log with the selected
    neurons, the final cost and the number of steps taken.
  """
  neurons = select_neurons(config, clean)
  keep = jnp.asarray(start > 0, jnp.float32)
  start = jnp.asarray(start)

  def cost(x):
    features = layer_input(clean, config.layer, (x * keep)[None])[0]
    return jnp.sum((features[neurons] - config.target_value) ** 2)

  def body(state):
    x, i, _ = state
    value, grad = jax.value_and_grad(cost)(x)
    x = x - config.step_size * jnp.sign(grad)
    x = jnp.clip(jnp.clip(x, start - config.epsilon, start + config.epsilon), 0.0, 1.0)
    return x, i + 1, value

  def cond(state):
    _, i, value = state
    return jnp.logical_and(i < config.steps, value >= config.tolerance)

  @jax.jit
  def run(start):
    x, steps, _ = jax.lax.while_loop(cond, body, (start, 0, jnp.float32(jnp.inf)))
    return x, steps, cost(x)

  x, steps, final = run(start)
  trigger = np.asarray(jnp.floor(x * keep * 255.0), np.uint8)
  return trigger, {"neurons": neurons.tolist(), "cost": float(final), "steps": int(steps)}
