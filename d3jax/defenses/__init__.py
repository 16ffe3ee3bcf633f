"""Post-training backdoor defenses: ``defend(name, ...)`` and the vmappable ``defense_run``.

A defense sees only the model and the reserved clean data (DESIGN.md threat model).
"""
from __future__ import annotations

import time
from types import ModuleType
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.dataset import validate_images, validate_labels

from d3jax.defenses import d3, ft
from d3jax.defenses.d3 import D3Config
from d3jax.defenses.ft import FTConfig
from d3jax.train import Hyperparams, Normalization

DEFENSES: dict[str, tuple[ModuleType, type]] = {"ft": (ft, FTConfig), "d3": (d3, D3Config)}


def lookup(name: str, config: Any) -> tuple[ModuleType, Any]:
  if name not in DEFENSES:
    raise ValueError(f"unknown defense {name!r}; available: {sorted(DEFENSES)}.")
  module, config_type = DEFENSES[name]
  config = config_type() if config is None else config
  if not isinstance(config, config_type):
    raise TypeError(f"defense {name!r} takes a {config_type.__name__}, got {type(config).__name__}.")
  return module, config


def check_reserved(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Validates the reserved set (uint8 NHWC images, labels in [0, C) of the model's C)."""
  images = np.asarray(images)
  validate_images(images, "reserved set images")
  num_classes = jax.eval_shape(
      lambda: model.apply(variables, jnp.zeros((1,) + images.shape[1:]), train=False)).shape[-1]
  return images, validate_labels(np.asarray(labels), num_classes, len(images), "reserved set labels")


def defense_run(name: str, model: nn.Module, normalization: Normalization, config: Any = None
                ) -> tuple[Callable[..., tuple[Any, jax.Array]], Hyperparams]:
  """A whole defense as ``run(variables, images, labels, hparams, key) -> (variables, losses)``.

  ``run`` is pure: ``jax.vmap`` it over any of the hyperparameters (a dict of arrays; the second
  return value holds the config's defaults), over keys, or over both.
  """
  module, config = lookup(name, config)
  return module.program(model, normalization, config).run, module.hyperparams(config)


def defend(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
           normalization: Normalization, key: jax.Array, config: Any = None,
           progress: bool = True) -> tuple[Any, dict[str, Any]]:
  """Runs defense ``name`` on the reserved set (images uint8 NHWC, true labels).

  Returns the defended variables and a log: per-epoch training losses, the wall time, and the
  config used.
  """
  module, config = lookup(name, config)
  images, labels = check_reserved(model, variables, images, labels)
  start = time.perf_counter()
  variables, losses = module.program(model, normalization, config).fit(
      variables, images, labels, module.hyperparams(config), key, desc=name, progress=progress)
  log = {"defense": name, "losses": losses.tolist(), "wall_time_s": time.perf_counter() - start,
         "config": config}
  return variables, log


__all__ = ["DEFENSES", "D3Config", "FTConfig", "check_reserved", "defend", "defense_run", "lookup"]
