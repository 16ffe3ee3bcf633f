"""Post-training backdoor defenses, registered by name.

``names()`` lists them, ``get(name, **overrides)`` builds a config (a frozen dataclass with the
published defaults), ``defend(name, ...)`` runs one, and ``program(name, ...)`` gives the
:class:`d3jax.engine.train.Program` behind a fine-tuning defense, for ``jax.vmap``/``jax.jit`` of whole
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
from d3jax.defenses.anp import ANPConfig
from d3jax.defenses.d3 import D3Config
from d3jax.defenses.fp import FPConfig
from d3jax.defenses.fst import FSTConfig
from d3jax.defenses.nc import NCConfig
from d3jax.defenses.ft import FTConfig
from d3jax.defenses.ft_sam import FTSAMConfig
from d3jax.defenses.ibau import IBAUConfig
from d3jax.defenses.nad import NADConfig
from d3jax.defenses.nft import NFTConfig
from d3jax.defenses.sau import SAUConfig
from d3jax.defenses.super_ft import SuperFTConfig
from d3jax.engine.train import EpochCallback, Normalization, Program, Restore, train

REGISTRY: dict[str, type] = {"ft": FTConfig, "d3": D3Config, "ft-sam": FTSAMConfig, "nft": NFTConfig,
                             "fst": FSTConfig, "fp": FPConfig, "nc": NCConfig, "i-bau": IBAUConfig, "anp": ANPConfig, "super-ft": SuperFTConfig,
                             "nad": NADConfig, "sau": SAUConfig}


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
  is a whole defense as one pure function (vmap it over hyperparameters or keys). A config class
  that sets ``program_class`` (a :class:`Program` with its own step) runs in that program."""
  config = resolve(name, config)
  if hasattr(config, "defend"):
    raise ValueError(f"defense {name!r} runs in stages ({type(config).__name__}.defend), not as one "
                     "training program; run it with d3jax.defend, not as a program or a sweep.")
  return getattr(config, "program_class", Program)(model, config, normalization)


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

  A defense that is not one fine-tuning program (FP: prune, then fine-tune) has a config class
  with its own ``defend(model, variables, images, labels, *, normalization, key, progress,
  callback, restore)``, which runs its stages on the engine; ``callback`` and ``restore`` then
  concern its last training stage.

  Returns the defended variables and a log: per-epoch training losses (of the last training
  stage), the wall time, the config used, and what the defense decided (e.g. FP's pruning).
  """
  config = resolve(name, config)
  images, labels = check_reserved(model, variables, images, labels)
  start = time.perf_counter()
  if hasattr(config, "defend"):
    variables, log = config.defend(model, variables, images, labels, normalization=normalization,
                                   key=key, progress=progress, callback=callback, restore=restore)
  else:
    variables, history = train(program(name, model, normalization, config), variables, images,
                               labels, key, desc=name, progress=progress, callback=callback,
                               restore=restore)
    log = {"losses": history.get("loss", np.zeros(0)).tolist()}
  log = {"defense": name, **log, "wall_time_s": time.perf_counter() - start, "config": config}
  return variables, log


__all__ = ["ANPConfig", "D3Config", "FPConfig", "FSTConfig", "FTConfig", "FTSAMConfig", "IBAUConfig",
           "NADConfig", "NCConfig", "NFTConfig", "REGISTRY", "SAUConfig", "SuperFTConfig", "check_reserved", "defend",
           "get", "names", "program", "resolve"]
