"""Grids of defense runs trained at once (d3jax.workflows.sweep) against the same runs done one by one."""
import dataclasses

import jax
import numpy as np
import pytest

from d3jax.engine import train
from d3jax.defenses import D3Config, FTConfig, defend
from d3jax.workflows.sweep import grid_points, sweep

NORM = train.Normalization((0.5,), (0.5,))


def test_grid_points_is_the_row_major_product_with_defaults():
  """Swept names vary in row-major order over the grid; the others keep their default."""
  points = grid_points({"lmd": 10.0, "eps": 0.1, "learning_rate": 0.01},
                       {"lmd": [0.5, 10.0], "eps": [0.1, 0.2, 0.3]})
  np.testing.assert_allclose(points["lmd"], [0.5, 0.5, 0.5, 10, 10, 10])
  np.testing.assert_allclose(points["eps"], [0.1, 0.2, 0.3] * 2, rtol=1e-6)
  np.testing.assert_allclose(points["learning_rate"], [0.01] * 6, rtol=1e-6)


def test_grid_points_rejects_unknown_names_and_empty_grids():
  with pytest.raises(ValueError, match="sweepable"):
    grid_points({"lmd": 10.0}, {"lambda": [1.0]})
  with pytest.raises(ValueError, match="empty"):
    grid_points({"lmd": 10.0}, {"lmd": []})


@pytest.mark.parametrize("name,config,grid,seeds", [
    ("d3", D3Config(epochs=2, batch_size=16, crop_padding=1), {"lmd": [0.5, 10.0], "eps": [0.1, 0.5]}, 1),
    ("d3", D3Config(epochs=2, batch_size=16, crop_padding=1), {"lmd": [0.5, 10.0]}, 2),
    ("ft", FTConfig(epochs=2, batch_size=16, crop_padding=1), {"learning_rate": [0.01, 0.1]}, 1),
])
@pytest.mark.slow
def test_sweep_matches_each_run_alone(model, variables, tiny_set, rbg_key, name, config, grid, seeds):
  """Every run of a grid (one vmapped program; seeds repeat each point with keys fold_in(key, s))
  equals `defend` at that point with that key. Batched keys need a PRNG whose draws do not
  depend on vmap (threefry; rbg's do), so the seeded case uses threefry."""
  x, y = tiny_set
  base_key = rbg_key if seeds == 1 else jax.random.key(0, impl="threefry2x32")
  defended, log = sweep(name, model, variables, x, y, normalization=NORM, key=base_key, grid=grid,
                        config=config, seeds=seeds, progress=False)
  points = log["hparams"]
  assert len(defended) == len(next(iter(points.values()))) == len(log["seeds"])
  assert np.asarray(log["losses"]).shape == (config.epochs, len(defended))
  for i, got in enumerate(defended):
    alone_config = dataclasses.replace(config, **{k: points[k][i] for k in grid})
    key = base_key if seeds == 1 else jax.random.fold_in(base_key, log["seeds"][i])
    alone, alone_log = defend(name, model, variables, x, y, normalization=NORM, key=key,
                              config=alone_config, progress=False)
    np.testing.assert_allclose(np.asarray(log["losses"])[:, i], alone_log["losses"], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  first, last = (jax.tree.leaves(defended[0])[-1], jax.tree.leaves(defended[-1])[-1])
  assert not np.allclose(first, last)


@pytest.mark.slow
def test_sweep_in_chunks_equals_one_chunk(model, variables, tiny_set, rbg_key):
  """A grid of 3 run in chunks of 2 (the last one padded) gives the same runs as one chunk."""
  x, y = tiny_set
  config = D3Config(epochs=1, batch_size=16, crop_padding=0)
  grid = {"lmd": [0.5, 2.0, 10.0]}
  whole, whole_log = sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, grid=grid,
                           config=config, progress=False)
  chunked, chunked_log = sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key,
                               grid=grid, config=config, chunk_size=2, progress=False)
  assert len(chunked) == 3
  np.testing.assert_allclose(chunked_log["losses"], whole_log["losses"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sweep_vmap_width_does_not_change_the_runs(model, variables, tiny_set, rbg_key):
  """The grid's runs are the same whether one vmap holds all 4, 2 at a time or 1 at a time
  (scanned in the same program); a width that does not divide the chunk is one clear error."""
  x, y = tiny_set
  config = D3Config(epochs=1, batch_size=16, crop_padding=0)
  grid = {"lmd": [0.5, 2.0, 5.0, 10.0]}
  results = [sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, grid=grid,
                   config=config, vmap_width=width, progress=False) for width in (None, 2, 1)]
  for defended, log in results[1:]:
    np.testing.assert_allclose(log["losses"], results[0][1]["losses"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(defended)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="vmap_width must be"):
    sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, grid=grid, config=config,
          vmap_width=3, progress=False)


def test_sweep_checks_the_reserved_set(model, variables, tiny_set, rbg_key):
  x, y = tiny_set
  with pytest.raises(ValueError, match="reserved set labels"):
    sweep("d3", model, variables, x, y + 10, normalization=NORM, key=rbg_key, grid={"lmd": [1.0]},
          progress=False)


def test_sweep_rejects_bad_seeds_and_scalar_grids(model, variables, tiny_set, rbg_key):
  """seeds must be a positive integer; a grid entry must be a list, not a scalar or a string."""
  x, y = tiny_set
  with pytest.raises(ValueError, match="seeds"):
    sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, grid={"lmd": [1.0]},
          seeds=0, progress=False)
  with pytest.raises(ValueError, match="list of numbers"):
    sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, grid={"lmd": 1.0},
          progress=False)
