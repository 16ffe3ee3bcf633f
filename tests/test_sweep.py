"""Grids of defense runs trained at once (d3jax.sweep) against the same runs done one by one."""
import dataclasses

import jax
import numpy as np
import pytest

from d3jax import train
from d3jax.defenses import D3Config, FTConfig, defend
from d3jax.sweep import grid_points, sweep

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


@pytest.mark.parametrize("name,config,grid,vectorize", [
    ("d3", D3Config(epochs=2, batch_size=16, crop_padding=1), {"lmd": [0.5, 10.0], "eps": [0.1, 0.5]}, True),
    ("d3", D3Config(epochs=2, batch_size=16, crop_padding=1), {"lmd": [0.5, 10.0]}, False),
    ("ft", FTConfig(epochs=2, batch_size=16, crop_padding=1), {"learning_rate": [0.01, 0.1]}, True),
])
def test_sweep_matches_each_run_alone(model, variables, tiny_set, rbg_key, name, config, grid,
                                      vectorize):
  """Every run of a grid (vmapped, or one after another) equals `defend` at that point."""
  x, y = tiny_set
  defended, log = sweep(name, model, variables, x, y, normalization=NORM, key=rbg_key, grid=grid,
                        config=config, progress=False, vectorize=vectorize)
  points = log["hparams"]
  assert len(defended) == len(next(iter(points.values())))
  assert np.asarray(log["losses"]).shape == (config.epochs, len(defended))
  for i, got in enumerate(defended):
    alone_config = dataclasses.replace(config, **{k: points[k][i] for k in grid})
    alone, alone_log = defend(name, model, variables, x, y, normalization=NORM, key=rbg_key,
                              config=alone_config, progress=False)
    np.testing.assert_allclose(np.asarray(log["losses"])[:, i], alone_log["losses"], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(got)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  first, last = (jax.tree.leaves(defended[0])[-1], jax.tree.leaves(defended[-1])[-1])
  assert not np.allclose(first, last)


def test_sweep_checks_the_reserved_set(model, variables, tiny_set, rbg_key):
  x, y = tiny_set
  with pytest.raises(ValueError, match="reserved set labels"):
    sweep("d3", model, variables, x, y + 10, normalization=NORM, key=rbg_key, grid={"lmd": [1.0]},
          progress=False)
