"""The clean model an attacker crafts a trigger against (LF's universal perturbation, TrojanNN's
neuron-driving trigger), with the clean images it may use."""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.augment import normalize
from d3jax.data.dataset import validate_images, validate_labels
from d3jax.engine.train import Normalization


class CleanModel(NamedTuple):
  """A trained clean classifier and clean data of the attacker.

  Attributes:
    model: a Linen classifier called as ``model.apply(variables, x, train=False)`` on normalized
      NHWC images.
    variables: its trained variables.
    normalization: the dataset's constants; crafting works on [0, 1] images and normalizes them.
    images: uint8 clean training images (N, H, W, C) the attacker may craft on.
    labels: their int labels (N,).
  """

  model: nn.Module
  variables: Any
  normalization: Normalization
  images: np.ndarray
  labels: np.ndarray

  def logits(self, unit_images: jax.Array) -> jax.Array:
    """Eval-mode logits of [0, 1]-valued float images (N, H, W, C)."""
    x = normalize(unit_images * 255.0, self.normalization.mean, self.normalization.std)
    return self.model.apply(self.variables, x, train=False)

  @property
  def num_classes(self) -> int:
    """The number of logits the model outputs."""
    probe = jax.ShapeDtypeStruct((1,) + self.images.shape[1:], jnp.float32)
    return int(jax.eval_shape(self.logits, probe).shape[-1])

  def checked(self, image_shape: tuple[int, int, int], what: str) -> "CleanModel":
    """Returns self (labels as int32) after checking its images match ``image_shape``."""
    validate_images(self.images, f"{what} clean images")
    if self.images.shape[1:] != tuple(image_shape):
      raise ValueError(
          f"{what}: the clean model's images have shape {self.images.shape[1:]} but the trigger is "
          f"built for {tuple(image_shape)}; pass images of the attacked dataset.")
    labels = validate_labels(self.labels, self.num_classes, len(self.images), f"{what} clean labels")
    return self._replace(labels=labels)


def unit(images: Any) -> jax.Array:
  """uint8 pixel values as float32 in [0, 1]."""
  return jnp.asarray(images, jnp.float32) / 255.0
