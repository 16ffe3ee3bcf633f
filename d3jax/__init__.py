"""d3jax: Distance-Driven Detoxification (D3) and post-training backdoor defenses in JAX/Flax.

Subpackages (all reachable after ``import d3jax``): ``data``, ``models``, ``attacks``,
``optim`` (the D3 optax transforms), ``defenses``, ``analysis`` (evaluation plots), ``interop``
(PyTorch/BackdoorBench checkpoints in and out); modules
``train`` (the jitted engine), ``sweep`` (grids trained at once), ``auto_choice`` (``auto``: a
grid's point chosen without test data), ``metrics``, ``checkpoint``, ``pipeline``.
"""
from d3jax import (analysis, attacks, checkpoint, data, defenses, interop, metrics, models, optim,
                   train)
from d3jax.sweep import sweep
from d3jax.auto_choice import auto
from d3jax.defenses import D3Config, FTConfig, defend
from d3jax.metrics import der
from d3jax.optim import d3

__version__ = "0.1.0"

__all__ = ["D3Config", "FTConfig", "analysis", "attacks", "auto", "checkpoint", "d3", "data", "defend",
           "defenses", "der", "interop", "metrics", "models", "optim", "sweep", "train"]
