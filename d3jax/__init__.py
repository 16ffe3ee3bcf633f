"""d3jax: Distance-Driven Detoxification (D3) and post-training backdoor defenses in JAX/Flax.

Subpackages (all reachable after ``import d3jax``): ``data``, ``models``, ``attacks``,
``optim`` (the D3 optax transforms), ``defenses``, ``analysis`` (evaluation plots), ``interop``
(PyTorch/BackdoorBench checkpoints in and out); the rooms ``engine`` (the jitted training loop;
``d3jax.train`` is ``d3jax.engine.train``), ``workflows`` (pipeline, ``sweep``, ``auto``),
``rundirs`` (run directories; ``d3jax.checkpoint`` is ``d3jax.rundirs.checkpoint``) and
``studies`` (sweep runs, Table 1); the module ``metrics``. docs/architecture.md has the layers.
"""
from d3jax import (analysis, attacks, data, defenses, engine, interop, metrics, models, optim,
                   rundirs, studies, workflows)
from d3jax.engine import train
from d3jax.rundirs import checkpoint
from d3jax.workflows.sweep import sweep
from d3jax.workflows.auto_choice import auto
from d3jax.defenses import D3Config, FTConfig, defend
from d3jax.metrics import der
from d3jax.optim import d3

__version__ = "0.1.0"

__all__ = ["D3Config", "FTConfig", "analysis", "attacks", "auto", "checkpoint", "d3", "data", "defend",
           "defenses", "der", "engine", "interop", "metrics", "models", "optim", "rundirs",
           "studies", "sweep", "train", "workflows"]
