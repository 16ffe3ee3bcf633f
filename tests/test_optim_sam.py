"""ASAM as an optax transformation, and the adaptive attack's recipe and program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3jax import attacks
from d3jax.attacks.adaptive import SAMProgram, SAMTraining
from d3jax.optim.sam import adaptive_sam
from d3jax.attacks.training import AttackTrainConfig
from d3jax.models import get_model
from d3jax.engine.train import Normalization


def test_asam_ascent_and_descent_formulas():
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
  grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([[-1.0]])}
  tx = adaptive_sam(optax.sgd(0.1), rho=2.0)
  state = tx.init(params)
  ascent, state = tx.update(grads, state, params)
  norm = np.sqrt((1 * 0.3) ** 2 + (2 * 0.4) ** 2 + (0.5 * 1.0) ** 2)  # ‖ |w| ⊙ g ‖
  np.testing.assert_allclose(ascent["a"], 2.0 * np.array([1.0, 4.0]) * np.array([0.3, 0.4]) / norm, rtol=1e-6)
  np.testing.assert_allclose(ascent["b"], [[2.0 * 0.25 * -1.0 / norm]], rtol=1e-6)
  perturbed = optax.apply_updates(params, ascent)
  g2 = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([[2.0]])}
  descent, state = tx.update(g2, state, perturbed)
  final = optax.apply_updates(perturbed, descent)
  # Back at w, then SGD with the gradient taken at w + e.
  np.testing.assert_allclose(final["a"], np.array([1.0, -2.0]) - 0.1, rtol=1e-6)
  np.testing.assert_allclose(final["b"], [[0.5 - 0.2]], rtol=1e-6)
  assert not bool(state.descend) and float(jnp.abs(state.perturbation["a"]).sum()) == 0.0
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state)


def test_asam_weight_decay_sees_the_restored_params():
  params = {"w": jnp.array([2.0])}
  tx = adaptive_sam(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(1.0)), rho=1.0)
  state = tx.init(params)
  ascent, state = tx.update({"w": jnp.array([1.0])}, state, params)
  descent, _ = tx.update({"w": jnp.array([0.0])}, state, optax.apply_updates(params, ascent))
  final = optax.apply_updates(optax.apply_updates(params, ascent), descent)
  np.testing.assert_allclose(final["w"], [2.0 - 0.5 * 2.0], rtol=1e-6)  # decay of w = 2, not w + e


@pytest.mark.slow
def test_adaptive_attack_config_and_program(rbg_key):
  config = attacks.get("adaptive", base="blended", rho=3.0)
  assert config.kind == "training" and config.rho == 3.0
  assert attacks.get("adaptive").trigger((8, 8, 1)).name == "badnets"
  assert config.trigger((8, 8, 1)).name == "blended"
  with pytest.raises(ValueError, match="pick a data-poisoning base attack"):
    attacks.get("adaptive", base="wanet").trigger((8, 8, 1))
  recipe = config.recipe(AttackTrainConfig(epochs=1, batch_size=8, crop_padding=0))
  assert isinstance(recipe, SAMTraining) and recipe.rho == 3.0 and recipe.batch_size == 8
  assert float(recipe.hyperparams()["rho"]) == 3.0
  with pytest.raises(ValueError, match="rho must be > 0"):
    SAMTraining(rho=0.0)
  # One SAM step moves the params, advances the step count once, and keeps the first pass's BN stats.
  model = get_model("small_cnn", 4, width=4)
  program = SAMProgram(model, recipe, Normalization((0.5,), (0.5,)))
  from d3jax.engine import train  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  labels = (np.arange(8) % 4).astype(np.int32)
  variables = train.init_variables(model, (8, 8, 1), rbg_key)
  state = train.init_state(program, variables, 8, rbg_key)
  batch = train.Batch(jnp.asarray(images), jnp.asarray(labels), jnp.ones(8, bool))
  after, metrics = jax.jit(program.step)(state, batch)
  plain, plain_metrics = jax.jit(super(SAMProgram, program).step)(state, batch)
  assert int(after.step) == 1 and bool(after.opt_state.descend) is False
  np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), after.batch_stats, plain.batch_stats)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), after.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0
