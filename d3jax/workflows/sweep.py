"""Hyperparameter grids of a whole defense as one compiled program, sharded over devices.

A grid of G runs is one :class:`d3jax.engine.train.TrainState` stacked on a leading axis and trained by
``jax.vmap`` of the defense's jitted epoch (:func:`d3jax.engine.train.grid_axes`): one compilation and
one dispatch per epoch serve every run. On one CPU device the runs are scanned one at a time
inside the same program by default (:func:`d3jax.engine.train.grid_vmap_width`: measured faster than one
vmap over the chunk, and than the same runs one by one, for the small CNN and PreAct-ResNet18);
``vmap_width=None`` vmaps the whole chunk.
The grid axis is laid out over ``jax.devices()`` with a
``Mesh`` and ``NamedSharding`` (one CPU, several GPUs or a TPU slice alike); when G is larger than
``chunk_size`` the grid runs in chunks of that many runs. For multi-host runs, call
``jax.distributed.initialize()`` first on every host: ``jax.devices()`` then lists every host's
devices and the same call spreads the grid over all of them.

With one seed, every run shares the key: the same batches, augmentation and warm start, so the
runs differ only by their hyperparameters, and the data side of each step is computed once.
With ``seeds`` > 1 every grid point is repeated with keys ``fold_in(key, seed)``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from d3jax.defenses import check_reserved, program as defense_program
from d3jax.engine.train import Normalization, Program, TrainState, fit, grid_axes, grid_vmap_width

PyTree = Any


def grid_points(defaults: Mapping[str, Any], grid: Mapping[str, Sequence[float]]) -> dict[str, np.ndarray]:
  """Hyperparameter arrays of shape (G,) over the cartesian product of ``grid`` (row-major in the
  order of ``grid``'s keys); names not in ``grid`` keep their default. Host (NumPy) float32 arrays:
  built and indexed without dispatching eager device operations, each of which would compile a
  small program of its own on the first sweep of a process."""
  unknown = sorted(set(grid) - set(defaults))
  if unknown:
    raise ValueError(f"cannot sweep {unknown}: the sweepable hyperparameters are {sorted(defaults)}.")
  for name, values in grid.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
      raise ValueError(f"grid[{name!r}] must be a list of numbers, got {values!r}.")
  names = list(grid)
  points = list(itertools.product(*(grid[name] for name in names)))
  if not points:
    raise ValueError("the grid is empty: give at least one value for each swept hyperparameter.")
  columns = {name: np.asarray([p[i] for p in points], np.float32) for i, name in enumerate(names)}
  return {name: columns.get(name, np.full((len(points),), np.asarray(value), np.float32))
          for name, value in defaults.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def init_grid(program: Program, axes: TrainState, variables: PyTree, n: int, keys: jax.Array,
              hparams: dict[str, jax.Array]) -> TrainState:
  """The stacked starting state of a grid: one run per row of ``hparams`` (and of ``keys`` when
  ``axes.key`` is 0; a single shared key otherwise)."""
  def one(key, point):
    return program.init(variables, n, key, point)

  return jax.vmap(one, in_axes=(axes.key, 0), out_axes=axes)(keys, hparams)


def shard_grid(state: TrainState, axes: TrainState, mesh: Mesh) -> TrainState:
  """Places the grid axis of every stacked field over the mesh's ``grid`` axis; the rest is
  replicated."""
  split = NamedSharding(mesh, PartitionSpec("grid"))
  replicated = NamedSharding(mesh, PartitionSpec())
  placed = {field.name: jax.device_put(getattr(state, field.name),
                                       split if getattr(axes, field.name) == 0 else replicated)
            for field in dataclasses.fields(TrainState)}
  return TrainState(**placed)


def sweep(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray, *,
          normalization: Normalization, key: jax.Array, grid: Mapping[str, Sequence[float]],
          config: Any = None, seeds: int = 1, chunk_size: int | None = None,
          devices: Sequence[jax.Device] | None = None, vmap_width: int | None | str = "auto",
          progress: bool = True) -> tuple[list[Any], dict[str, Any]]:
  """Runs defense ``name`` for every point of ``grid`` (e.g. ``{"lmd": [1, 10], "eps": [0.1, 0.3]}``)
  and every seed, as one vmapped program per chunk, sharded over ``devices``.

  ``vmap_width`` runs share one vmap inside a chunk's program (the vmapped groups are scanned);
  ``"auto"`` takes :func:`d3jax.engine.train.grid_vmap_width` (on one CPU device: 1, the runs scanned
  one at a time, measured fastest), None vmaps the whole chunk.

  Returns the defended variables of each run (a list, grid-major then seed) and a log with the
  hyperparameters and seed of each run, the grid as given, and the per-epoch losses (epochs, runs).
  """
  defense = defense_program(name, model, normalization, config)
  images, labels = check_reserved(model, variables, images, labels)
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds must be an integer ≥ 1, got {seeds!r}.")
  points = grid_points(defense.recipe.hyperparams(), grid)
  hparams = {k: np.repeat(v, seeds) for k, v in points.items()}
  runs = len(next(iter(hparams.values())))
  seed_of_run = np.tile(np.arange(seeds), runs // seeds)
  axes = grid_axes(shared_key=seeds == 1)
  keys = key if seeds == 1 else jnp.stack([jax.random.fold_in(key, s) for s in seed_of_run])

  mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ("grid",))
  width = mesh.devices.size
  chunk = min(chunk_size or runs, runs)
  if chunk < 1:
    raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size!r}.")
  chunk = -(-chunk // width) * width  # a multiple of the device count
  if vmap_width == "auto":
    vmap_width = grid_vmap_width(chunk, width)
  replicated = NamedSharding(mesh, PartitionSpec())
  images, labels = jax.device_put((jnp.asarray(images), jnp.asarray(labels)), replicated)

  defended, losses = [], []
  for start in range(0, runs, chunk):
    rows = np.minimum(np.arange(start, start + chunk), runs - 1)  # pad by repeating the last run
    real = min(chunk, runs - start)
    chunk_keys = keys if seeds == 1 else keys[rows]
    state = init_grid(defense, axes, variables, images.shape[0], chunk_keys,
                      {k: v[rows] for k, v in hparams.items()})
    state = shard_grid(state, axes, mesh)
    label = f"{name} grid {start + 1}-{start + real}/{runs}" if runs > chunk else f"{name} grid of {runs}"
    state, history = fit(defense, state, images, labels, axes=axes, vmap_width=vmap_width,
                         desc=label, progress=progress)
    stacked = jax.device_get(state.variables)
    defended += [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(real)]
    losses.append(history["loss"][:, :real])
  log = {"defense": name, "hparams": {k: np.asarray(v).tolist() for k, v in hparams.items()},
         "grid": {k: [float(value) for value in values] for k, values in grid.items()},
         "seeds": seed_of_run.tolist(), "losses": np.concatenate(losses, axis=1).tolist(),
         "config": defense.recipe}
  return defended, log


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
  """``["lmd=1,10,20", "eps=0,0.1"]`` → ``{"lmd": [1.0, 10.0, 20.0], "eps": [0.0, 0.1]}``.

  Raises:
    ValueError: an item without ``name=values``, a repeated name, or a value that is not a number.
  """
  grid: dict[str, list[float]] = {}
  for item in items:
    name, sep, values = item.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
      raise ValueError(f"--grid entries must read name=v1,v2,... (e.g. lmd=1,10,20), got {item!r}.")
    if name in grid:
      raise ValueError(f"--grid names {name!r} twice; give each hyperparameter once.")
    try:
      grid[name] = [float(value) for value in values.split(",")]
    except ValueError:
      raise ValueError(f"--grid {name}: values must be numbers separated by commas, got "
                       f"{values!r}.") from None
  if not grid:
    raise ValueError("--grid is empty: give at least one name=v1,v2,... entry.")
  return grid


def aggregate(log: Mapping[str, Any], measured: Mapping[str, Sequence[float]]) -> list[dict]:
  """One row per grid point of a :func:`sweep` log: the swept hyperparameters, the number of
  seeds, and for every column of ``measured`` (one value per run) its mean and standard
  deviation over seeds (``<column>`` and ``<column>_std``; sample std, 0 with one seed)."""
  runs = len(log["seeds"])
  seeds = max(log["seeds"]) + 1
  for column, values in measured.items():
    if len(values) != runs:
      raise ValueError(f"measured[{column!r}] has {len(values)} values for a sweep of {runs} runs.")
  rows = []
  for point, values_at in enumerate(itertools.product(*log["grid"].values())):
    span = slice(point * seeds, (point + 1) * seeds)
    row: dict[str, Any] = dict(zip(log["grid"], values_at))
    row["seeds"] = seeds
    for column, values in measured.items():
      chunk = np.asarray(values[span], np.float64)
      row[column] = float(chunk.mean())
      row[f"{column}_std"] = float(chunk.std(ddof=1)) if seeds > 1 else 0.0
    rows.append(row)
  return rows
