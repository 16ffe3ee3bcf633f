"""Tests of d3jax.optim: the D3 optimizer (paper Eq. (4), supplement Algorithm 1) as optax transformations.

The reference for every numeric check is written here independently of d3jax: the official
objective as a hand-written jnp function (differentiated by jax.grad) and the official per-step
order (SGD with PyTorch momentum, then W ← W·‖W0‖/‖W‖) in NumPy float64.
"""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import base

from d3jax.optim import (clean_hinge, d3, distance, distance_ascent, loss_scale, norm_gradient,
                         param_paths, project_norm, select_mask, tensor_norm)
from d3jax.optim.d3 import TargetNormState

NORMS = ("fro", "l1", "nuclear")
NO_PARAMS = re.escape(base.NO_PARAMS_MSG)


# ----------------------------------------------------------------------------------------------
# Independent reference implementations (NumPy, float64).
# ----------------------------------------------------------------------------------------------

def np_matrix(x):
  """Nuclear-norm view: leading axes flattened, last kept; a 1-D tensor is a column."""
  x = np.asarray(x, np.float64)
  return x.reshape(-1, 1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])


def np_norm(x, norm):
  x = np.asarray(x, np.float64)
  if norm == "fro":
    return float(np.sqrt(np.sum(x * x)))
  if norm == "l1":
    return float(np.sum(np.abs(x)))
  return float(np.sum(np.linalg.svd(np_matrix(x), compute_uv=False)))


def np_norm_grad(x, norm):
  """∂‖x‖/∂x with the value 0 at x = 0 (PyTorch's convention for the 2-norm)."""
  x = np.asarray(x, np.float64)
  if norm == "fro":
    n = np.sqrt(np.sum(x * x))
    return x / n if n > 0 else np.zeros_like(x)
  if norm == "l1":
    return np.sign(x)
  u, s, vt = np.linalg.svd(np_matrix(x), full_matrices=False)
  keep = s > 1e-12 * max(s.max(initial=0.0), 1e-300)
  return ((u * keep) @ vt).reshape(x.shape)


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def to_jnp(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# A tiny MLP in pure jax (plain dicts, no Flax) and the official clean loss written by hand.
# ----------------------------------------------------------------------------------------------

def make_mlp(seed, din=3, dh=4, dout=3, scale=1.0):
  rng = np.random.default_rng(seed)
  return to_jnp({
      "dense": {"kernel": scale * rng.normal(size=(din, dh)), "bias": 0.1 * rng.normal(size=(dh,))},
      "head": {"kernel": scale * rng.normal(size=(dh, dout)), "bias": 0.1 * rng.normal(size=(dout,))},
  })


def mlp_logits(params, x):
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def per_sample_ce(params, x, y):
  logits = mlp_logits(params, x)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]


def hand_hinge(params, x, y, eps):
  """L_c = mean_i max(0, CE_i − ε), written without d3jax."""
  return jnp.mean(jnp.maximum(per_sample_ce(params, x, y) - eps, 0.0))


def make_data(seed, n=8, din=3, classes=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(n, din)), jnp.float32), jnp.asarray(rng.integers(0, classes, n))


def pick_eps(params, x, y):
  """An ε between the per-sample losses, so that the hinge is active for some samples only."""
  ce = np.sort(np.asarray(per_sample_ce(params, x, y)))
  eps = float(0.5 * (ce[len(ce) // 2 - 1] + ce[len(ce) // 2]))
  assert (ce < eps).any() and (ce > eps).any()
  return eps


def jnp_norm(x, norm):
  """Hand-written norms for the official objective (independent of d3jax.optim.norms)."""
  if norm == "fro":
    return jnp.sqrt(jnp.sum(x * x))
  if norm == "l1":
    return jnp.sum(jnp.abs(x))
  m = x.reshape(-1, 1) if x.ndim == 1 else x.reshape(-1, x.shape[-1])
  return jnp.sum(jnp.linalg.svd(m, compute_uv=False))


def official_loss(params, reference, selected_paths, x, y, eps, lmd, norm):
  """Spec §5.5: (λ·L_c − D)/(λ+1) if λ > 1 else λ·L_c − D, D = Σ_selected ‖W − W0‖ (not squared)."""
  lc = hand_hinge(params, x, y, eps)
  d = sum(jnp_norm(params[a][b] - reference[a][b], norm) for a, b in selected_paths)
  loss = lmd * lc - d
  return loss / (lmd + 1.0) if lmd > 1 else loss


def perturb(params, seed, size=0.3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + jnp.asarray(size * rng.normal(size=p.shape), p.dtype), params)


def numpy_d3(params, reference, selected_paths, grad_fn, lmd, lrs, norm, momentum=0.9):
  """The official per-step order (the official code: optimizer step, then rescaling) in float64: PyTorch SGD momentum, then projection.

  ``grad_fn(params_float32) -> grad of L_c`` supplies the clean gradient from jax. Returns the
  params after each step.
  """
  w = to_np(params)
  w0 = to_np(reference)
  s = lmd + 1.0 if lmd > 1 else 1.0
  buf = None
  history = []
  for lr in lrs:
    g = to_np(grad_fn(to_jnp(w)))
    full = {a: {b: lmd * g[a][b] / s for b in g[a]} for a in g}
    for a, b in selected_paths:
      full[a][b] = full[a][b] - np_norm_grad(w[a][b] - w0[a][b], norm) / s
    if buf is None:
      buf = full
    else:
      buf = {a: {b: momentum * buf[a][b] + full[a][b] for b in full[a]} for a in full}
    w = {a: {b: w[a][b] - lr * buf[a][b] for b in w[a]} for a in w}
    for a, b in selected_paths:
      w[a][b] = w[a][b] * np_norm(w0[a][b], norm) / np_norm(w[a][b], norm)
    history.append(w)
  return history


def run_d3(tx, params, grad_fn, steps):
  state = tx.init(params)
  history = []
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


# ----------------------------------------------------------------------------------------------
# 1. project_norm
# ----------------------------------------------------------------------------------------------

def projection_tree(seed=0):
  rng = np.random.default_rng(seed)
  return to_jnp({
      "conv": {"kernel": rng.normal(size=(2, 2, 3, 4))},          # HWIO
      "dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))},
      "head": {"bias": rng.normal(size=(3,))},
  })


PROJECTION_MASK = {"conv": {"kernel": True}, "dense": {"kernel": True, "bias": True},
                   "head": {"bias": False}}


@pytest.mark.parametrize("norm", NORMS)
def test_project_norm_lands_on_reference_norm(norm):
  """Each selected tensor (4-D HWIO, 2-D, 1-D) ends with exactly its reference norm, along the
  direction of params + update; the unselected tensor gets the update unchanged."""
  reference = projection_tree(0)
  params = perturb(reference, 1, size=0.5)
  updates = perturb(jax.tree.map(jnp.zeros_like, reference), 2, size=0.4)
  tx = project_norm(reference, PROJECTION_MASK, norm)
  out, state = tx.update(updates, tx.init(params), params)
  assert isinstance(state, TargetNormState)
  np.testing.assert_allclose(state.targets["dense"]["kernel"], np_norm(reference["dense"]["kernel"], norm),
                             rtol=1e-5)
  assert state.targets["head"]["bias"] is None
  new = optax.apply_updates(params, out)
  for path in (("conv", "kernel"), ("dense", "kernel"), ("dense", "bias")):
    a, b = path
    target = np_norm(reference[a][b], norm)
    assert np_norm(new[a][b], norm) == pytest.approx(target, rel=1e-5)
    moved = np.asarray(params[a][b], np.float64) + np.asarray(updates[a][b], np.float64)
    np.testing.assert_allclose(new[a][b], moved * target / np_norm(moved, norm), rtol=1e-5, atol=1e-6)
    # d3jax's own norm agrees with the independent NumPy one (incl. the HWIO → (H·W·I, O) view).
    assert float(tensor_norm(reference[a][b], norm)) == pytest.approx(target, rel=1e-5)
  assert out["head"]["bias"] is updates["head"]["bias"] or np.array_equal(out["head"]["bias"],
                                                                           updates["head"]["bias"])


@pytest.mark.parametrize("norm", NORMS)
def test_project_norm_zero_landing_stays_zero(norm):
  """A step that lands a selected tensor exactly on zero leaves it at zero (no direction to
  rescale), finite, and leaves the other selected tensors projected as usual."""
  reference = projection_tree(0)
  params = perturb(reference, 3)
  updates = perturb(jax.tree.map(jnp.zeros_like, reference), 4)
  updates["dense"]["kernel"] = -params["dense"]["kernel"]
  tx = project_norm(reference, PROJECTION_MASK, norm)
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  new = optax.apply_updates(params, out)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(out))
  np.testing.assert_array_equal(new["dense"]["kernel"], 0.0)
  assert np_norm(new["conv"]["kernel"], norm) == pytest.approx(np_norm(reference["conv"]["kernel"], norm),
                                                               rel=1e-5)


# ----------------------------------------------------------------------------------------------
# 2. distance_ascent == autodiff gradient of the official objective
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("lmd", [0.5, 10.0])
@pytest.mark.parametrize("select,selected_paths", [
    ("head/kernel", [("head", "kernel")]),
    (".*kernel", [("dense", "kernel"), ("head", "kernel")]),
])
def test_distance_ascent_is_gradient_of_official_loss(norm, lmd, select, selected_paths):
  """Fed ∇L_c, distance_ascent returns ∇[(λ·L_c − D)/s] for every leaf (selected ones get the
  distance term, the others only λ·g/s), s = λ+1 for λ = 10 and 1 for λ = 0.5, at a generic
  point θ ≠ θ_ref (for nuclear: against jax.grad of the sum of singular values)."""
  reference = make_mlp(0)
  params = perturb(reference, 1)
  x, y = make_data(2)
  eps = pick_eps(params, x, y)
  clean_grad = jax.grad(hand_hinge)(params, x, y, eps)
  expected = jax.grad(official_loss)(params, reference, selected_paths, x, y, eps, lmd, norm)
  tx = distance_ascent(reference, select, lmd, norm)
  got, _ = tx.update(clean_grad, tx.init(params), params)
  assert_tree_close(got, expected, rtol=1e-5, atol=1e-6)
  # The test bites: the distance term moves the selected leaves, and the clean gradient is not 0.
  unselected_only = jax.tree.map(lambda g: lmd * g / loss_scale(lmd), clean_grad)
  a, b = selected_paths[0]
  assert np.abs(np.asarray(got[a][b] - unselected_only[a][b])).max() > 1e-3
  assert np.abs(np.asarray(clean_grad["dense"]["bias"])).max() > 1e-4


@pytest.mark.parametrize("shape", [(4, 3), (2, 2, 3, 4), (5,)])
def test_nuclear_norm_gradient_matches_autodiff(shape):
  """norm_gradient(x, "nuclear") is U·Vᵀ of the matrix view: equal to jax.grad of Σ σ_i (and the
  NumPy U·Vᵀ) at a generic point, for a matrix, an HWIO kernel and a 1-D tensor."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=shape), jnp.float32)
  got = norm_gradient(x, "nuclear")
  assert got.shape == x.shape
  np.testing.assert_allclose(got, jax.grad(jnp_norm)(x, "nuclear"), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, np_norm_grad(x, "nuclear"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["fro", "l1"])
def test_norm_gradient_matches_autodiff(norm):
  """norm_gradient equals jax.grad of the hand-written norm at a generic point (fro: x/‖x‖,
  l1: sign(x))."""
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 2, 3, 4)), jnp.float32)
  np.testing.assert_allclose(norm_gradient(x, norm), jax.grad(jnp_norm)(x, norm), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. Full d3 steps == the official algorithm in NumPy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,lmd", [("fro", 0.5), ("fro", 1.0), ("fro", 10.0), ("l1", 0.5),
                                      ("l1", 10.0), ("nuclear", 0.5), ("nuclear", 10.0)])
def test_d3_steps_match_numpy_official_algorithm(norm, lmd):
  """Three chained d3 steps (momentum buffer b ← 0.9·b + g, w ← w − lr·b, first b = g; then
  W ← W·‖W0‖/‖W‖ for selected tensors only) equal the NumPy float64 official algorithm.
  λ = 1 checks the strict λ > 1 rule (no rescale at exactly 1)."""
  reference = make_mlp(0)
  x, y = make_data(2)
  start = perturb(reference, 7, size=0.2)
  start["head"]["kernel"] = start["head"]["kernel"] * (
      np_norm(reference["head"]["kernel"], norm) / np_norm(start["head"]["kernel"], norm))
  eps = pick_eps(start, x, y)
  grad_fn = jax.jit(lambda p: jax.grad(hand_hinge)(p, x, y, eps))
  lr = 0.3
  expected = numpy_d3(start, reference, [("head", "kernel")], grad_fn, lmd, [lr] * 3, norm)
  got = run_d3(d3(reference, "head/kernel", lr, momentum=0.9, lmd=lmd, norm=norm), start, grad_fn, 3)
  for g, e in zip(got, expected):
    assert_tree_close(g, e, rtol=1e-5, atol=1e-5)
  # Bites: the params really moved, and the unselected dense kernel is not projected.
  assert np.abs(np.asarray(got[-1]["head"]["kernel"] - start["head"]["kernel"])).max() > 1e-3
  assert np_norm(got[-1]["dense"]["kernel"], norm) != pytest.approx(np_norm(reference["dense"]["kernel"], norm),
                                                                    rel=1e-4)


def test_d3_first_step_from_reference_matches_numpy():
  """Started at θ = θ_ref ('near'), the distance gradient is 0 (not NaN) and one and two steps
  still equal the official algorithm."""
  reference = make_mlp(0)
  x, y = make_data(2)
  eps = pick_eps(reference, x, y)
  grad_fn = jax.jit(lambda p: jax.grad(hand_hinge)(p, x, y, eps))
  paths = [("dense", "kernel"), ("head", "kernel")]
  expected = numpy_d3(reference, reference, paths, grad_fn, 10.0, [0.5, 0.5], "fro")
  got = run_d3(d3(reference, ".*kernel", 0.5), reference, grad_fn, 2)
  for g, e in zip(got, expected):
    assert_tree_close(g, e)


# ----------------------------------------------------------------------------------------------
# 4. Zero distance: gradient 0, not NaN; distance is a sum of (unsquared) norms.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 3, 4), (5,)])
def test_norm_gradient_at_zero_is_zero(norm, shape):
  """∂‖x‖/∂x at x = 0 is exactly 0 (PyTorch's convention for the norm's gradient), never NaN, also
  under jit."""
  zero = jnp.zeros(shape, jnp.float32)
  for fn in (norm_gradient, jax.jit(norm_gradient, static_argnums=1)):
    got = np.asarray(fn(zero, norm))
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, 0.0)


@pytest.mark.parametrize("norm", NORMS)
def test_distance_ascent_at_reference_has_no_distance_term(norm):
  """At θ = θ_ref distance_ascent returns exactly λ·g/s for the selected tensors (no NaN)."""
  reference = make_mlp(0)
  g = perturb(jax.tree.map(jnp.zeros_like, reference), 3)
  tx = distance_ascent(reference, ".*kernel", 10.0, norm)
  got, _ = tx.update(g, tx.init(reference), reference)
  assert_tree_close(got, jax.tree.map(lambda a: a * 10.0 / 11.0, g), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm", NORMS)
def test_distance_is_sum_of_unsquared_norms(norm):
  """distance(θ, θ) = 0; distance(θ, θ_ref) = Σ over the 2 selected kernels of ‖θ − θ_ref‖ (not
  squared, not averaged; biases excluded)."""
  reference = make_mlp(0)
  params = perturb(reference, 1, size=1.0)
  assert float(distance(reference, reference, ".*kernel", norm)) == 0.0
  expected = sum(np_norm(np.asarray(params[a]["kernel"]) - np.asarray(reference[a]["kernel"]), norm)
                 for a in ("dense", "head"))
  got = float(distance(params, reference, ".*kernel", norm))
  assert got == pytest.approx(expected, rel=1e-5)
  squared = sum(np_norm(np.asarray(params[a]["kernel"]) - np.asarray(reference[a]["kernel"]), norm) ** 2
                for a in ("dense", "head"))
  assert got != pytest.approx(squared, rel=1e-3)
  assert float(distance(params, reference, "head/kernel", norm)) == pytest.approx(
      np_norm(np.asarray(params["head"]["kernel"]) - np.asarray(reference["head"]["kernel"]), norm), rel=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_autodiff_of_distance_at_zero_is_zero(norm):
  """A user differentiating the public `distance` at the 'near' start should get 0, not NaN."""
  reference = make_mlp(0)
  grad = jax.grad(lambda p: distance(p, reference, ".*kernel", norm))(reference)
  for leaf in jax.tree.leaves(grad):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


# ----------------------------------------------------------------------------------------------
# 5. λ traced: vmap and jit
# ----------------------------------------------------------------------------------------------

LAMBDAS = (0.5, 1.0, 2.0, 10.0)


def one_step(reference, start, grad, lmd, lr=0.3):
  tx = d3(reference, "head/kernel", lr, lmd=lmd)
  updates, _ = tx.update(grad, tx.init(start), start)
  return optax.apply_updates(start, updates)


@pytest.mark.slow
def test_d3_vmap_over_lambda_matches_single_runs():
  """vmap over λ ∈ {0.5, 1, 2, 10} (optimizer built inside the vmapped function, so λ > 1 must be
  a jnp.where) equals each λ run alone with a Python float, and equals the NumPy algorithm."""
  reference = make_mlp(0)
  start = perturb(reference, 7, size=0.2)
  x, y = make_data(2)
  eps = pick_eps(start, x, y)
  grad_fn = jax.jit(lambda p: jax.grad(hand_hinge)(p, x, y, eps))
  grad = grad_fn(start)
  batched = jax.vmap(lambda lmd: one_step(reference, start, grad, lmd))(jnp.asarray(LAMBDAS))
  jitted = jax.jit(lambda lmd: one_step(reference, start, grad, lmd))
  results = []
  for i, lmd in enumerate(LAMBDAS):
    alone = one_step(reference, start, grad, lmd)
    assert_tree_close(jax.tree.map(lambda a, i=i: a[i], batched), alone, rtol=1e-6, atol=1e-6)
    assert_tree_close(jitted(jnp.float32(lmd)), alone, rtol=1e-6, atol=1e-6)
    assert_tree_close(alone, numpy_d3(start, reference, [("head", "kernel")], grad_fn, lmd, [0.3], "fro")[0])
    results.append(alone)
  # λ = 1 and λ = 2 straddle the rescale: they must differ by more than the λ factor alone.
  assert not np.allclose(results[1]["dense"]["kernel"], results[2]["dense"]["kernel"], atol=1e-4)


def test_loss_scale_rule():
  """s = λ + 1 strictly above 1, else 1 — for floats, traced scalars and arrays."""
  np.testing.assert_allclose(loss_scale(jnp.asarray(LAMBDAS)), [1.0, 1.0, 3.0, 11.0])
  assert float(jax.jit(loss_scale)(1.0)) == 1.0
  assert float(jax.jit(loss_scale)(10.0)) == 11.0


class D3VariantsTest(chex.TestCase):
  """The d3 update as a pure function, with and without jit (chex.variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_steps_with_traced_lambda_match_numpy(self):
    """Two steps with λ and the learning rate passed as arrays into the (jitted) step equal the
    official algorithm; the momentum state carries between the two calls."""
    reference = make_mlp(0)
    start = perturb(reference, 7, size=0.2)
    x, y = make_data(2)
    eps = pick_eps(start, x, y)
    grad_fn = jax.jit(lambda p: jax.grad(hand_hinge)(p, x, y, eps))

    @self.variant
    def step(params, state, lmd, lr):
      tx = d3(reference, "head/kernel", lr, lmd=lmd)
      updates, state = tx.update(grad_fn(params), state, params)
      return optax.apply_updates(params, updates), state

    for lmd in (0.5, 10.0):
      state = d3(reference, "head/kernel", 0.3, lmd=lmd).init(start)
      params = start
      expected = numpy_d3(start, reference, [("head", "kernel")], grad_fn, lmd, [0.3, 0.3], "fro")
      for e in expected:
        params, state = step(params, state, jnp.float32(lmd), jnp.float32(0.3))
        assert_tree_close(params, e)


# ----------------------------------------------------------------------------------------------
# 6. Learning rate: schedule and traced array
# ----------------------------------------------------------------------------------------------

def test_d3_learning_rate_schedule():
  """An optax schedule (0.4 at step 0, 0.1 after) gives w ← w − lr_t·b with the PyTorch buffer,
  step by step as in NumPy."""
  reference = make_mlp(0)
  start = perturb(reference, 7, size=0.2)
  x, y = make_data(2)
  eps = pick_eps(start, x, y)
  grad_fn = jax.jit(lambda p: jax.grad(hand_hinge)(p, x, y, eps))
  schedule = optax.piecewise_constant_schedule(0.4, {1: 0.25})
  got = run_d3(d3(reference, "head/kernel", schedule, lmd=0.5), start, grad_fn, 3)
  expected = numpy_d3(start, reference, [("head", "kernel")], grad_fn, 0.5, [0.4, 0.1, 0.1], "fro")
  for g, e in zip(got, expected):
    assert_tree_close(g, e)
  constant = run_d3(d3(reference, "head/kernel", 0.4, lmd=0.5), start, grad_fn, 3)
  assert not np.allclose(constant[-1]["dense"]["kernel"], got[-1]["dense"]["kernel"], atol=1e-4)


def test_d3_learning_rate_traced_array():
  """A learning rate that is a traced array (jit argument and vmap axis) equals the float one."""
  reference = make_mlp(0)
  start = perturb(reference, 7, size=0.2)
  x, y = make_data(2)
  grad = jax.grad(hand_hinge)(start, x, y, pick_eps(start, x, y))

  def step(lr):
    return one_step(reference, start, grad, 10.0, lr=lr)

  lrs = (0.1, 0.3)
  batched = jax.vmap(step)(jnp.asarray(lrs))
  jitted = jax.jit(step)
  for i, lr in enumerate(lrs):
    alone = step(lr)
    assert_tree_close(jitted(jnp.float32(lr)), alone, rtol=1e-6, atol=1e-6)
    assert_tree_close(jax.tree.map(lambda a, i=i: a[i], batched), alone, rtol=1e-6, atol=1e-6)
  assert not np.allclose(batched["dense"]["kernel"][0], batched["dense"]["kernel"][1])


# ----------------------------------------------------------------------------------------------
# 7. No params → optax's error
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda r: distance_ascent(r, "head/kernel"),
    lambda r: project_norm(r, "head/kernel"),
    lambda r: d3(r, "head/kernel", 0.1),
], ids=["distance_ascent", "project_norm", "d3"])
def test_update_without_params_raises(make):
  """Params-aware transforms raise optax's NO_PARAMS_MSG ValueError when params are missing."""
  reference = make_mlp(0)
  tx = make(reference)
  state = tx.init(reference)
  with pytest.raises(ValueError, match=NO_PARAMS):
    tx.update(reference, state)
  with pytest.raises(ValueError, match=NO_PARAMS):
    tx.update(reference, state, None)


# ----------------------------------------------------------------------------------------------
# 8. Selection
# ----------------------------------------------------------------------------------------------

def selection_tree():
  z = jnp.zeros((2,))
  return {"linear": {"kernel": z, "bias": z}, "conv1": {"kernel": z},
          "block": {"linear": {"kernel": z}}}


def selected(mask):
  return sorted(p for p, m in zip(param_paths(mask), jax.tree.leaves(mask)) if m)


def test_param_paths_are_slash_joined():
  """Paths are '/'-joined dict keys in flattening order."""
  assert param_paths(selection_tree()) == ["block/linear/kernel", "conv1/kernel", "linear/bias",
                                           "linear/kernel"]


def test_regex_select_is_fullmatch():
  """'linear/kernel' selects only the top-level head (fullmatch, not search: the nested
  block/linear/kernel is not selected); '.*kernel' selects every kernel."""
  tree = selection_tree()
  assert selected(select_mask(tree, "linear/kernel")) == ["linear/kernel"]
  assert selected(select_mask(tree, ".*kernel")) == ["block/linear/kernel", "conv1/kernel", "linear/kernel"]
  assert selected(select_mask(tree, "linear/.*")) == ["linear/bias", "linear/kernel"]


def test_regex_matching_nothing_lists_paths():
  """'kernel' matches no full path → ValueError whose message lists the available paths."""
  with pytest.raises(ValueError, match="matched no parameter path") as info:
    select_mask(selection_tree(), "kernel")
  assert "linear/kernel" in str(info.value) and "conv1/kernel" in str(info.value)
  with pytest.raises(ValueError, match="matched no parameter path"):
    d3(selection_tree(), "kernel", 0.1)


def test_invalid_regex_raises_value_error():
  """A malformed regex is a ValueError (not re.error)."""
  with pytest.raises(ValueError, match="not a valid regular expression"):
    select_mask(selection_tree(), "linear/(kernel")


def test_boolean_mask_select():
  """A pytree of Python bools is used as is, and d3 with it equals d3 with the equivalent regex."""
  reference = make_mlp(0)
  mask = {"dense": {"kernel": True, "bias": False}, "head": {"kernel": True, "bias": False}}
  assert select_mask(reference, mask) == mask
  start = perturb(reference, 3)
  grad = perturb(jax.tree.map(jnp.zeros_like, reference), 4)
  for norm in NORMS:
    by_mask = one_step_tx(d3(reference, mask, 0.1, norm=norm), start, grad)
    by_regex = one_step_tx(d3(reference, ".*kernel", 0.1, norm=norm), start, grad)
    by_head = one_step_tx(d3(reference, "head/kernel", 0.1, norm=norm), start, grad)
    assert_tree_close(by_mask, by_regex, rtol=0, atol=0)
    assert not np.allclose(by_mask["dense"]["kernel"], by_head["dense"]["kernel"])


def one_step_tx(tx, params, grad):
  updates, _ = tx.update(grad, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_bad_boolean_masks_raise():
  """Wrong structure, non-bool leaves and an all-False mask are ValueErrors."""
  tree = selection_tree()
  with pytest.raises(ValueError, match="structure"):
    select_mask(tree, {"linear": {"kernel": True, "bias": False}})
  with pytest.raises(ValueError, match="structure"):
    d3(make_mlp(0), {"head": {"kernel": True, "bias": False}}, 0.1)
  with pytest.raises(ValueError, match="Python booleans"):
    select_mask(tree, jax.tree.map(lambda _: 1, tree))
  with pytest.raises(ValueError, match="selects no parameter"):
    select_mask(tree, jax.tree.map(lambda _: False, tree))


def test_unknown_norm_raises():
  """Every entry point rejects an unknown norm with a ValueError naming the choices."""
  reference = make_mlp(0)
  calls = [
      lambda: d3(reference, "head/kernel", 0.1, norm="l2"),
      lambda: distance_ascent(reference, "head/kernel", norm="l2"),
      lambda: project_norm(reference, "head/kernel", norm="l2"),
      lambda: distance(reference, reference, "head/kernel", norm="l2"),
      lambda: tensor_norm(reference["head"]["kernel"], "l2"),
      lambda: norm_gradient(reference["head"]["kernel"], "l2"),
  ]
  for call in calls:
    with pytest.raises(ValueError, match="unknown norm 'l2'"):
      call()


# ----------------------------------------------------------------------------------------------
# 9. End to end on a params pytree d3jax did not create
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_d3_detoxifies_foreign_mlp():
  """A plain-dict two-layer MLP (pure jax) trained on a 2-D two-blob task (overlapping enough that
  the ε-hinge stays active): 60 d3 steps on its head push the head far from θ_ref (distance
  grows > 10×, past ‖θ_ref‖) while the head's norm stays the reference norm at every step, the
  clean hinge does not blow up and clean training accuracy stays at the reference's."""
  rng = np.random.default_rng(0)
  n = 64
  y = rng.integers(0, 2, n)
  x = rng.normal(size=(n, 2)) * 0.8 + np.where(y[:, None] == 1, 1.0, -1.0)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  params = make_mlp(1, din=2, dh=16, dout=2, scale=0.5)

  def ce(p):
    return jnp.mean(per_sample_ce(p, x, y))

  adam = optax.adam(0.05)

  def train(carry, _):
    p, s = carry
    u, s = adam.update(jax.grad(ce)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  reference, _ = jax.jit(lambda p: jax.lax.scan(train, (p, adam.init(p)), length=100)[0])(params)

  def accuracy(p):
    return float(jnp.mean(jnp.argmax(mlp_logits(p, x), -1) == y))

  ref_accuracy = accuracy(reference)
  assert ref_accuracy >= 0.9
  ref_head = np.asarray(reference["head"]["kernel"], np.float64)
  target = np_norm(ref_head, "fro")

  # Warm start: a small step off θ_ref, back on the sphere (the distance gradient is 0 at θ_ref).
  start = dict(reference, head=dict(reference["head"]))
  moved = ref_head + 0.05 * target * rng.normal(size=ref_head.shape) / np.sqrt(ref_head.size)
  start["head"]["kernel"] = jnp.asarray(moved * target / np_norm(moved, "fro"), jnp.float32)
  tx = d3(reference, "head/kernel", 0.2, lmd=10.0)
  eps = 0.1
  hinge_start = float(clean_hinge(per_sample_ce(start, x, y), eps))
  assert hinge_start > 0.01   # the clean term is active, so it constrains the walk

  def d3_step(carry, _):
    p, s = carry
    g = jax.grad(lambda q: clean_hinge(per_sample_ce(q, x, y), eps))(p)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (tensor_norm(p["head"]["kernel"], "fro"), distance(p, reference, "head/kernel"))

  (final, _), (norms, dists) = jax.jit(
      lambda p: jax.lax.scan(d3_step, (p, tx.init(p)), length=60))(start)
  d_start = np_norm(np.asarray(start["head"]["kernel"]) - ref_head, "fro")
  d_final = np_norm(np.asarray(final["head"]["kernel"]) - ref_head, "fro")
  np.testing.assert_allclose(norms, target, rtol=1e-5)
  np.testing.assert_allclose(dists[-1], d_final, rtol=1e-5)
  assert d_final > 10 * d_start and d_final > target
  assert accuracy(final) >= ref_accuracy - 0.02
  assert float(clean_hinge(per_sample_ce(final, x, y), eps)) < 1.5 * hinge_start
  # Only the head is projected/selected; the other layers still train on the clean loss.
  assert not np.allclose(final["dense"]["kernel"], reference["dense"]["kernel"])


# ----------------------------------------------------------------------------------------------
# 10. clean_hinge
# ----------------------------------------------------------------------------------------------

def test_clean_hinge_is_per_sample_then_mean():
  """mean_i max(0, ℓ_i − ε): samples below ε count as 0 in the mean (not dropped, and not the
  hinge of the mean loss)."""
  losses = jnp.asarray([0.05, 0.3, 1.0, 0.1])
  got = float(clean_hinge(losses, 0.1))
  assert got == pytest.approx((0.0 + 0.2 + 0.9 + 0.0) / 4, rel=1e-6)
  assert got != pytest.approx(max(0.0, float(jnp.mean(losses)) - 0.1), rel=1e-3)   # hinge of the mean
  assert got != pytest.approx((0.2 + 0.9) / 2, rel=1e-3)                           # positives only
  assert float(jax.jit(clean_hinge)(losses, jnp.float32(0.1))) == pytest.approx(got, rel=1e-6)


def test_clean_hinge_mask_excludes_padding():
  """A False mask entry removes the sample from both sum and count; gradients there are 0;
  an all-padding batch gives 0, not NaN."""
  losses = jnp.asarray([0.05, 0.3, 5.0, 1.0])
  mask = jnp.asarray([True, True, False, True])
  assert float(clean_hinge(losses, 0.1, mask)) == pytest.approx((0.0 + 0.2 + 0.9) / 3, rel=1e-6)
  grad = jax.grad(clean_hinge)(losses, 0.1, mask)
  np.testing.assert_allclose(grad, [0.0, 1 / 3, 0.0, 1 / 3], rtol=1e-6)
  assert float(clean_hinge(losses, 0.1, jnp.zeros(4, bool))) == 0.0


def test_clean_hinge_mask_ignores_nonfinite_padding():
  """An excluded sample must not influence the result, whatever its value."""
  losses = jnp.asarray([0.05, 0.3, jnp.inf, 1.0])
  mask = jnp.asarray([True, True, False, True])
  assert float(clean_hinge(losses, 0.1, mask)) == pytest.approx((0.0 + 0.2 + 0.9) / 3, rel=1e-6)


def test_nnx_state_gets_a_clear_error():
  """A flax.nnx State (Variable wrappers as leaves) is refused with a message that says to pass
  nnx.to_pure_dict(...); the pure dict works."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.head = nnx.Linear(4, 3, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match="to_pure_dict"):
    d3(state, "head/kernel", 0.1)
  with pytest.raises(ValueError, match="to_pure_dict"):
    d3(None, "head/kernel", 0.1).init(state)
  pure = nnx.to_pure_dict(state)
  tx = d3(None, "head/kernel", 0.1)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, pure), tx.init(pure), pure)
  assert jax.tree.structure(updates) == jax.tree.structure(pure)


def test_reference_lives_in_the_state_and_can_differ_per_run():
  """d3(None, ...) takes its reference from init's params, equals d3(reference, ...), keeps only
  the selected tensors, and a vmap over states with different references runs each alone."""
  reference = make_mlp(0)
  params = perturb(reference, 1)
  grad = perturb(jax.tree.map(jnp.zeros_like, reference), 2)
  implicit = d3(None, "head/kernel", 0.1)
  explicit = d3(reference, "head/kernel", 0.1)
  state = implicit.init(reference)
  assert state[0].reference["dense"]["kernel"] is None
  a, _ = implicit.update(grad, state, params)
  b, _ = explicit.update(grad, explicit.init(params), params)
  assert_tree_close(a, b, rtol=0, atol=0)
  references = [make_mlp(0), make_mlp(5)]
  states = jax.tree.map(lambda *x: jnp.stack(x), *[implicit.init(r) for r in references])
  batched, _ = jax.vmap(implicit.update, in_axes=(None, 0, None))(grad, states, params)
  for i, r in enumerate(references):
    alone, _ = implicit.update(grad, implicit.init(r), params)
    assert_tree_close(jax.tree.map(lambda x: x[i], batched), alone, rtol=1e-6, atol=1e-7)


def test_reference_with_other_shapes_is_refused():
  """A reference of another model (other structure or shapes) is one ValueError."""
  with pytest.raises(ValueError, match="structure"):
    d3({"head": {"kernel": jnp.ones((4, 3))}}, "head/kernel", 0.1).init(make_mlp(0))
  wrong = make_mlp(0, dh=5)
  with pytest.raises(ValueError, match="shape"):
    d3(wrong, "head/kernel", 0.1).init(make_mlp(0))
