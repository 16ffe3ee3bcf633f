"""Hyperparameter grids of a whole defense, trained at once (DESIGN.md "Scale").

``sweep`` takes the cartesian product of the given hyperparameter values (the rest come from the
config). On accelerators it trains all runs together through :meth:`d3jax.train.FineTune.fit`
with ``grid=True`` — one vmapped step, one compilation, the same batches for every run. On the
CPU backend it trains them one after another by default: XLA:CPU runs the vmapped convolutions
(one weight set per run) far slower than separate ones — measured on the demo's small CNN,
5 vmapped D3 runs took 323 s against about 17 s for one run alone (experiments/results/
lambda_sweep.md). Both orders see the same batches and keys. For a pure function to
``jax.vmap`` or ``jax.jit`` yourself, see :func:`d3jax.defenses.defense_run`.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.defenses import check_reserved, lookup
from d3jax.train import Normalization


def grid_points(defaults: Mapping[str, Any], grid: Mapping[str, Sequence[float]]) -> dict[str, jax.Array]:
  """Hyperparameter arrays of shape (G,) over the cartesian product of ``grid`` (row-major in the
  order of ``grid``'s keys); names not in ``grid`` keep their default."""
  unknown = sorted(set(grid) - set(defaults))
  if unknown:
    raise ValueError(f"cannot sweep {unknown}: the sweepable hyperparameters are {sorted(defaults)}.")
  names = list(grid)
  points = list(itertools.product(*(grid[name] for name in names)))
  if not points:
    raise ValueError("the grid is empty: give at least one value for each swept hyperparameter.")
  columns = {name: jnp.asarray([p[i] for p in points], jnp.float32) for i, name in enumerate(names)}
  return {name: columns.get(name, jnp.full((len(points),), value, jnp.float32))
          for name, value in defaults.items()}


def sweep(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
          normalization: Normalization, key: jax.Array, grid: Mapping[str, Sequence[float]],
          config: Any = None, progress: bool = True,
          vectorize: bool | None = None) -> tuple[list[Any], dict[str, Any]]:
  """Runs defense ``name`` for every point of ``grid`` (e.g. ``{"lmd": [0.5, 10], "eps": [0.1, 0.3]}``).

  Returns the defended variables of each run (a list, in grid order) and a log with the
  hyperparameters of each run and the per-epoch losses (epochs, G). ``vectorize`` chooses
  between one vmapped program and one run after another (None: vmapped except on CPU).
  """
  module, config = lookup(name, config)
  images, labels = check_reserved(model, variables, images, labels)
  hparams = grid_points(module.hyperparams(config), grid)
  program = module.program(model, normalization, config)
  runs = len(next(iter(hparams.values())))
  if vectorize is None:
    vectorize = jax.default_backend() != "cpu"
  if vectorize:
    stacked, losses = program.fit(variables, images, labels, hparams, key, desc=f"{name} sweep",
                                  progress=progress, grid=True)
    defended = [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(runs)]
  else:
    defended, losses = [], []
    for i in range(runs):
      point = {k: v[i] for k, v in hparams.items()}
      result, run_losses = program.fit(variables, images, labels, point, key,
                                       desc=f"{name} sweep {i + 1}/{runs}", progress=progress)
      defended.append(result)
      losses.append(run_losses)
    losses = np.stack(losses, axis=1)
  log = {"defense": name, "hparams": {k: np.asarray(v).tolist() for k, v in hparams.items()},
         "losses": losses.tolist(), "config": config}
  return defended, log
