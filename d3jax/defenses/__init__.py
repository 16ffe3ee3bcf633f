"""Post-training backdoor defenses, registered by name.

``names()`` lists them, ``get(name, **overrides)`` builds a config (a frozen dataclass with the
published defaults), ``defend(name, ...)`` runs one, and ``program(name, ...)`` gives the
:class:`d3jax.train.Program` behind a fine-tuning defense, for ``jax.vmap``/``jax.jit`` of whole
runs. A defense sees only the model and the reserved clean data (DESIGN.md threat model): no
entry point here takes test data, a trigger or a target label.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.dataset import validate_images, validate_labels
from d3jax.defenses.d3 import D3Config
from d3jax.defenses.ft import FTConfig
from d3jax.train import EpochCallback, Normalization, Program, Restore, train

REGISTRY: dict[str, type] = {"ft": FTConfig, "d3": D3Config}


def names() -> tuple[str, ...]:
  """The registered defenses."""
  return tuple(REGISTRY)


def config_type(name: str) -> type:
  if name not in REGISTRY:
    raise ValueError(f"unknown defense {name!r}; available: {', '.join(REGISTRY)}.")
  return REGISTRY[name]


def get(name: str, **overrides: Any) -> Any:
  """The config of defense ``name`` with its published defaults and ``overrides``.

  Raises:
    ValueError: an unknown defense, an unknown field (the message lists the fields), or a field
      value the config rejects.
  """
  cls = config_type(name)
  fields = [field.name for field in dataclasses.fields(cls)]
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"defense {name!r} has no setting {', '.join(unknown)}; its settings are "
                     f"{', '.join(fields)}.")
  return cls(**overrides)


def resolve(name: str, config: Any = None) -> Any:
  """``config`` checked against defense ``name`` (None: the defaults)."""
  cls = config_type(name)
  if config is None:
    return cls()
  if type(config) is not cls:
    raise TypeError(f"defense {name!r} takes a {cls.__name__}, got {type(config).__name__}.")
  return config


def program(name: str, model: nn.Module, normalization: Normalization, config: Any = None) -> Program:
  """The training program of defense ``name``: ``program.init(...)`` then ``program.run(...)``
  is a whole defense as one pure function (vmap it over hyperparameters or keys)."""
  return Program(model, resolve(name, config), normalization)


def check_reserved(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Validates the reserved set (uint8 NHWC images, labels in [0, C) of the model's C)."""
  images = np.asarray(images)
  validate_images(images, "reserved set images")
  num_classes = jax.eval_shape(
      lambda: model.apply(variables, jnp.zeros((1,) + images.shape[1:]), train=False)).shape[-1]
  return images, validate_labels(np.asarray(labels), num_classes, len(images), "reserved set labels")


def defend(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
           normalization: Normalization, key: jax.Array, config: Any = None, progress: bool = True,
           callback: EpochCallback | None = None, restore: Restore | None = None
           ) -> tuple[Any, dict[str, Any]]:
  """Runs defense ``name`` on the reserved set (images uint8 NHWC, true labels).

  Compiles once per (defense config, model, data shapes): a second call with the same settings
  reuses the compiled code. ``callback(epoch, state, metrics)`` runs after every epoch;
  ``restore(fresh_state)`` may return a saved state of this run to continue from (resume).

  Returns the defended variables and a log: per-epoch training losses, the wall time, and the
  config used.
  """
  defense = program(name, model, normalization, config)
  images, labels = check_reserved(model, variables, images, labels)
  start = time.perf_counter()
  variables, history = train(defense, variables, images, labels, key, desc=name, progress=progress,
                             callback=callback, restore=restore)
  log = {"defense": name, "losses": history.get("loss", np.zeros(0)).tolist(),
         "wall_time_s": time.perf_counter() - start, "config": defense.recipe}
  return variables, log


from d3jax.defenses.auto import auto  # noqa: E402  (auto uses the helpers above)

__all__ = ["D3Config", "FTConfig", "REGISTRY", "auto", "check_reserved", "defend", "get", "names",
           "program", "resolve"]
