"""Tests of d3jax.engine.train: batch plans, the per-epoch cosine, PyTorch-style SGD, the engine (state,
run vs fit, resume, grids, masking, BN modes, NaN check) and batched prediction."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3jax.engine import train
from d3jax.data import normalize

NORM = train.Normalization((0.5,), (0.5,))


def _leaves_close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                                                       atol=atol), a, b)


def _torch_cosine(base_lr, t_max, epochs):
  """PyTorch CosineAnnealingLR (eta_min 0) via its recursive ``get_lr``, one value per epoch."""
  lrs = [base_lr]
  for e in range(1, epochs):
    last = lrs[-1]
    if (e - 1 - t_max) % (2 * t_max) == 0:
      lrs.append(last + base_lr * (1 - math.cos(math.pi / t_max)) / 2)
    else:
      ratio = (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max))
      lrs.append(ratio * last)
  return np.array(lrs)


# batch_plan.


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (3, 8), (1, 1), (7, 7)])
def test_batch_plan_covers_every_sample_once(rbg_key, n, batch_size):
  """Fixed shape, every sample once among unmasked entries, padding only at the tail."""
  indices, mask = map(np.asarray, train.batch_plan(rbg_key, n, batch_size))
  num_batches = math.ceil(n / batch_size)
  assert indices.shape == mask.shape == (num_batches, batch_size)
  assert mask.dtype == bool
  np.testing.assert_array_equal(mask.ravel(), np.arange(num_batches * batch_size) < n)
  np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(n))
  assert indices.min() >= 0 and indices.max() < n


def test_batch_plan_is_deterministic_per_key(rbg_key):
  """Same key → same plan; another key → another permutation."""
  a = np.asarray(train.batch_plan(rbg_key, 50, 16)[0])
  b = np.asarray(train.batch_plan(rbg_key, 50, 16)[0])
  c = np.asarray(train.batch_plan(jax.random.fold_in(rbg_key, 1), 50, 16)[0])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# Schedule and optimizer.


@pytest.mark.parametrize("t_max", [100, 5])
def test_cosine_per_epoch_matches_torch(t_max):
  """Per-step values equal CosineAnnealingLR of the step's epoch (constant within an epoch)."""
  epochs, steps, base = 5, 3, 0.1
  schedule = train.cosine_per_epoch(base, steps, t_max)
  got = np.array([float(schedule(count)) for count in range(epochs * steps)])
  got = got.reshape(epochs, steps)
  expected = _torch_cosine(base, t_max, epochs)
  np.testing.assert_allclose(got, np.repeat(expected[:, None], steps, 1), rtol=1e-5)
  assert got[0, 0] == pytest.approx(base)
  if t_max == epochs:  # the last epoch still trains; epoch T would reach 0
    assert got[-1, 0] > 0 and float(schedule(epochs * steps)) == pytest.approx(0.0, abs=1e-8)


def test_cosine_per_epoch_traced_base_lr_through_sgd():
  """A traced base lr works, and SGD's k-th update uses the lr of epoch k // steps_per_epoch."""
  steps, t_max = 2, 4

  @jax.jit
  def updates(base_lr):
    schedule = train.cosine_per_epoch(base_lr, steps, t_max)
    tx = train.sgd_with_weight_decay(schedule, 0.0, momentum=0.0)
    params = jnp.zeros(())
    state = tx.init(params)
    out = []
    for _ in range(3 * steps):
      update, state = tx.update(jnp.ones(()), state, params)
      out.append(update)
    return jnp.stack(out)

  expected = -np.repeat(_torch_cosine(0.3, t_max, 3), steps)
  np.testing.assert_allclose(np.asarray(updates(jnp.float32(0.3))), expected, rtol=1e-5)


def test_sgd_with_weight_decay_matches_torch_by_hand():
  """Two steps equal torch SGD(momentum=0.9, weight_decay=wd): b ← m·b + g + wd·w; w ← w − lr·b."""
  rng = np.random.default_rng(0)
  w0 = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}
  grads = [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))} for _ in range(2)]
  lr, wd, m = 0.1, 0.05, 0.9

  w = {k: v.copy() for k, v in w0.items()}
  buf = None
  for g in grads:
    d = {k: g[k] + wd * w[k] for k in w}
    buf = d if buf is None else {k: m * buf[k] + d[k] for k in w}
    w = {k: w[k] - lr * buf[k] for k in w}

  tx = train.sgd_with_weight_decay(lr, wd, momentum=m)
  params = jax.tree.map(jnp.float32, w0)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.float32, g), state, params)
    params = optax.apply_updates(params, updates)
  _leaves_close(params, w, rtol=1e-5, atol=1e-6)


# The engine.


def sgd(epochs=2, batch_size=16, **overrides):
  return train.SGDConfig(**{"epochs": epochs, "batch_size": batch_size, "crop_padding": 1,
                            "flip": True, "cosine_t_max": epochs, **overrides})


class NaNLoss(train.SGDConfig):
  """A recipe whose loss is NaN from the first step."""

  def loss(self, logits, labels, mask, hparams):
    return train.cross_entropy(logits, labels, mask, hparams) * jnp.nan


def test_state_carries_the_run(model, variables, tiny_set, rbg_key):
  """init puts params, statistics, optimizer state, hyperparameters (as arrays), step and key in
  the state; overrides replace defaults and unknown names are refused."""
  program = train.Program(model, sgd(learning_rate=0.1), NORM)
  state = program.init(variables, 40, rbg_key, {"weight_decay": 0.0})
  assert int(state.step) == 0 and int(state.steps_per_epoch) == 3
  assert set(state.hparams) == {"learning_rate", "weight_decay"}
  assert float(state.hparams["learning_rate"]) == pytest.approx(0.1)
  assert float(state.hparams["weight_decay"]) == 0.0
  chex.assert_trees_all_equal(state.params, variables["params"])
  chex.assert_trees_all_equal(state.variables, variables)
  with pytest.raises(ValueError, match="lmd"):
    program.init(variables, 40, rbg_key, {"lmd": 1.0})


def test_run_and_fit_agree(model, variables, tiny_set, rbg_key):
  """The pure lax.scan run and the host-driven fit give the same variables and losses."""
  x, y = map(jnp.asarray, tiny_set)
  program = train.Program(model, sgd(learning_rate=0.1), NORM)
  state = train.init_state(program, variables, 40, rbg_key)
  ran, ran_metrics = jax.jit(program.run)(state, x, y)
  fitted, fit_metrics = train.fit(program, state, x, y, progress=False)
  assert ran_metrics["loss"].shape == fit_metrics["loss"].shape == (2,)
  np.testing.assert_allclose(fit_metrics["loss"], np.asarray(ran_metrics["loss"]), rtol=1e-5)
  _leaves_close(ran.variables, fitted.variables, rtol=1e-5, atol=1e-6)
  assert int(fitted.step) == 2 * 3
  assert not np.allclose(fitted.params["linear"]["kernel"], variables["params"]["linear"]["kernel"])


def test_fit_resumes_exactly(model, variables, tiny_set, rbg_key):
  """Stopping after epoch 1 and calling fit again on that state gives bit-identical results to
  an uninterrupted run (every random stream is derived from the key and the step)."""
  x, y = tiny_set
  program = train.Program(model, sgd(epochs=3, learning_rate=0.1), NORM)
  state = train.init_state(program, variables, 40, rbg_key)
  whole, whole_metrics = train.fit(program, state, x, y, progress=False)
  saved = []
  with pytest.raises(KeyboardInterrupt):
    train.fit(program, state, x, y, progress=False,
              callback=lambda epoch, s, m: saved.append(s) or (_ for _ in ()).throw(KeyboardInterrupt))
  resumed, resumed_metrics = train.fit(program, saved[0], x, y, progress=False)
  assert resumed_metrics["loss"].shape == (2,)
  np.testing.assert_array_equal(resumed_metrics["loss"], whole_metrics["loss"][1:])
  chex.assert_trees_all_equal(resumed.variables, whole.variables)
  chex.assert_trees_all_equal(resumed.opt_state, whole.opt_state)


def test_runs_are_deterministic_per_key(model, variables, tiny_set, rbg_key):
  """Same key → bit-identical variables; another key → other batches and other results."""
  x, y = tiny_set
  program = train.Program(model, sgd(learning_rate=0.1), NORM)
  a, _ = train.train(program, variables, x, y, rbg_key, progress=False)
  b, _ = train.train(program, variables, x, y, rbg_key, progress=False)
  c, _ = train.train(program, variables, x, y, jax.random.fold_in(rbg_key, 1), progress=False)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["params"]["linear"]["kernel"], c["params"]["linear"]["kernel"])


@pytest.mark.slow
def test_vmapped_grid_matches_runs_alone(model, variables, tiny_set, rbg_key):
  """A grid of states (shared key, stacked hyperparameters) trained by one vmapped epoch equals
  each run trained alone."""
  from d3jax.workflows.sweep import init_grid
  x, y = map(jnp.asarray, tiny_set)
  program = train.Program(model, sgd(learning_rate=0.1), NORM)
  axes = train.grid_axes()
  lrs = jnp.array([0.01, 0.1, 0.3])
  grid = init_grid(program, axes, variables, 40, rbg_key,
                   {"learning_rate": lrs, "weight_decay": jnp.full(3, 5e-4)})
  assert grid.step.shape == () and grid.hparams["learning_rate"].shape == (3,)
  grid, grid_metrics = train.fit(program, grid, x, y, axes=axes, progress=False)
  assert grid_metrics["loss"].shape == (2, 3)
  for i, lr in enumerate(lrs):
    alone, metrics = train.train(program, variables, x, y, rbg_key,
                                 hparams={"learning_rate": lr}, progress=False)
    np.testing.assert_allclose(grid_metrics["loss"][:, i], metrics["loss"], rtol=1e-4)
    _leaves_close(jax.tree.map(lambda leaf: leaf[i], grid.variables), alone, rtol=1e-4, atol=1e-5)


def test_step_ignores_padded_samples(model, variables, tiny_set, rbg_key):
  """One engine step: changing the images and labels of masked entries leaves the update alone
  (BN in eval mode, so batch statistics cannot carry them in)."""
  x, y = map(jnp.asarray, tiny_set)
  program = train.Program(model, sgd(epochs=1, batch_size=8, crop_padding=0, flip=False,
                                     train_mode=False, weight_decay=0.0, learning_rate=0.1), NORM)
  state = program.init(variables, 40, rbg_key)
  valid = jnp.arange(8) < 5
  step = jax.jit(program.step)
  a, metrics_a = step(state, train.Batch(x[:8], y[:8], valid))
  x_b = x[:8].at[5:8].set(255 - x[5:8])
  y_b = y[:8].at[5:8].set((y[5:8] + 3) % 10)
  b, metrics_b = step(state, train.Batch(x_b, y_b, valid))
  assert float(metrics_a["loss"]) == pytest.approx(float(metrics_b["loss"]), rel=1e-6)
  assert int(a.step) == 1
  _leaves_close(a.params, b.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("train_mode", [True, False])
def test_batch_stats_follow_train_mode(model, variables, tiny_set, rbg_key, train_mode):
  """BN running statistics move in train mode and stay fixed otherwise; params train in both."""
  x, y = tiny_set
  program = train.Program(model, sgd(epochs=1, batch_size=20, crop_padding=0, train_mode=train_mode,
                                     learning_rate=0.1, weight_decay=0.0), NORM)
  out, _ = train.train(program, variables, x, y, rbg_key, progress=False)
  same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                      variables["batch_stats"], out["batch_stats"]))
  assert (not any(same)) if train_mode else all(same)
  assert not np.allclose(out["params"]["linear"]["kernel"], variables["params"]["linear"]["kernel"])


def test_fit_raises_on_nan_loss(model, variables, tiny_set, rbg_key):
  """A loss that is NaN from the start stops ``fit`` in epoch 1 with a FloatingPointError."""
  x, y = tiny_set
  program = train.Program(model, NaNLoss(epochs=3, batch_size=40, crop_padding=0), NORM)
  with pytest.raises(FloatingPointError, match=r"nan-test.*epoch 1\b"):
    train.train(program, variables, x, y, rbg_key, progress=False, desc="nan-test")


def test_fit_raises_when_training_diverges(model, variables, tiny_set, rbg_key):
  """An absurd learning rate makes the loss NaN after the first update: the error names epoch 2."""
  x, y = tiny_set
  program = train.Program(model, sgd(epochs=5, batch_size=40, crop_padding=0,
                                     learning_rate=1e30, weight_decay=0.0), NORM)
  seen = []
  with pytest.raises(FloatingPointError, match=r"epoch 2\b"):
    train.train(program, variables, x, y, rbg_key, progress=False,
                callback=lambda epoch, state, metrics: seen.append(epoch))
  assert seen == [0]


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("epochs", 1.5),
                                          ("learning_rate", -1.0), ("momentum", 1.0),
                                          ("cosine_t_max", 0), ("crop_padding", -2),
                                          ("weight_decay", float("nan"))])
def test_sgd_config_rejects_invalid_fields(field, value):
  """Invalid schedule or optimizer settings raise a ValueError naming the field."""
  with pytest.raises(ValueError, match=field):
    train.SGDConfig(**{field: value})


# Prediction.


@pytest.fixture(scope="module")
def eval_variables(variables):
  """Variables with non-trivial BN running statistics, so train vs eval mode would differ."""
  rng = np.random.default_rng(1)
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.2, 1.5, a.shape), a.dtype),
                       variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize("batch_size", [5, 23, 500])
def test_predict_matches_direct_apply(model, eval_variables, tiny_set, batch_size):
  """Batched eval-mode logits (N = 23, not a multiple of the batch) equal one model.apply."""
  x = tiny_set[0][:23]
  expected = model.apply(eval_variables, normalize(x, NORM.mean, NORM.std), train=False)
  logits = train.predict_logits(model, eval_variables, x, NORM, batch_size=batch_size)
  assert logits.shape == (23, 10)
  np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-5, atol=1e-5)
  predicted = train.predict(model, eval_variables, x, NORM, batch_size=batch_size)
  np.testing.assert_array_equal(predicted, np.asarray(expected).argmax(-1))


@pytest.mark.parametrize("bad", [
    lambda x: x.astype(np.float32), lambda x: x.astype(np.int32), lambda x: x[..., 0]])
def test_predict_rejects_non_uint8_nhwc(model, variables, tiny_set, bad):
  """Float/int images and 3-D arrays raise ValueError."""
  with pytest.raises(ValueError, match="uint8 NHWC"):
    train.predict(model, variables, bad(tiny_set[0]), NORM)


def test_predict_rejects_empty_input_clearly(model, variables, tiny_set):
  """An empty batch of images gets a ValueError, not an arithmetic error."""
  with pytest.raises(ValueError):
    train.predict(model, variables, tiny_set[0][:0], NORM)


# Variables.


def test_split_and_join_variables():
  """split_variables needs 'params', rejects unknown collections, defaults batch_stats to {}."""
  params, stats = {"w": jnp.ones(2)}, {"m": jnp.zeros(2)}
  assert train.split_variables({"params": params, "batch_stats": stats}) == (params, stats)
  assert train.split_variables({"params": params}) == (params, {})
  assert train.join_variables(params, {}) == {"params": params}
  assert train.join_variables(params, stats) == {"params": params, "batch_stats": stats}
  with pytest.raises(ValueError, match="'params'"):
    train.split_variables({"batch_stats": stats})
  with pytest.raises(ValueError, match="intermediates"):
    train.split_variables({"params": params, "intermediates": {}})
