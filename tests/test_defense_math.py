"""The core mathematics of the baseline defenses, on toy params (no training): FT-SAM's ASAM
perturbation, smoothed loss and per-iteration cosine; NFT's clamp bounds and mask folding; FST's
feature-shift gradient, head re-initialisation and norm reset; Super-FT's cyclic rate; FP's
pruning rule and frozen pruned weights; the registry's configs and their checks."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3jax import defenses
from d3jax.defenses import FPConfig, FSTConfig, FTSAMConfig, NCConfig, NFTConfig, SuperFTConfig
from d3jax.defenses import anp, nc
from d3jax.defenses.fp import prune_depth
from d3jax.defenses.fst import reinitialise_head
from d3jax.defenses.ibau import project_l2
from d3jax.defenses.ft_sam import cosine_per_step, smoothed_cross_entropy
from d3jax.defenses.super_ft import cyclic_rate
from d3jax.optim.fst import feature_shift
from d3jax.optim.hypergrad import hypergradient
from d3jax.optim.masks import lower_bounds, mask_penalty, neuron_masks
from d3jax.optim.prune import keep_pruned

TOY = {"bn1": {"scale": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.array([0.1, 0.2, 0.3])},
       "bn2": {"scale": jnp.array([3.0, 0.0])},
       "linear": {"kernel": jnp.array([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]]),
                  "bias": jnp.array([0.5, -0.5])}}


def _grads(key=0):
  leaves, treedef = jax.tree.flatten(TOY)
  keys = jax.random.split(jax.random.key(key), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


# FT-SAM.


def test_ft_sam_ascent_is_the_asam_formula():
  """The first update is e = ρ·w²⊙g/‖|w|⊙g‖₂ (global norm), the second returns to w and takes
  SGD's step (weight decay on w) with the gradient given at w + e."""
  config = FTSAMConfig(rho=2.0, learning_rate=0.1, weight_decay=0.01, momentum=0.0)
  tx = config.optimizer(defenses.program("ft-sam", None, None, config).hyperparams(), 1)
  state = tx.init(TOY)
  g, g2 = _grads(0), _grads(1)
  ascent, state = tx.update(g, state, TOY)
  norm = np.sqrt(sum(np.sum((np.abs(w) * gw) ** 2) for w, gw in zip(jax.tree.leaves(TOY), jax.tree.leaves(g))))
  for e, w, gw in zip(jax.tree.leaves(ascent), jax.tree.leaves(TOY), jax.tree.leaves(g)):
    np.testing.assert_allclose(e, 2.0 * w * w * gw / norm, rtol=1e-5, atol=1e-7)
  moved = optax.apply_updates(TOY, ascent)
  descent, _ = tx.update(g2, state, moved)
  landed = optax.apply_updates(moved, descent)
  for new, w, gw in zip(jax.tree.leaves(landed), jax.tree.leaves(TOY), jax.tree.leaves(g2)):
    np.testing.assert_allclose(new, w - 0.1 * (gw + 0.01 * w), rtol=1e-5, atol=1e-6)


def test_ft_sam_smoothed_loss_and_cosine_per_iteration():
  """Targets 1 − s on the label and s/(C − 1) elsewhere; s = 0 is plain CE. The rate is
  lr·½(1 + cos(π t/100)) per iteration, periodic (back to lr at t = 200)."""
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  labels, mask = jnp.array([0, 2]), jnp.ones(2, bool)
  log_p = jax.nn.log_softmax(logits)
  expected = -np.mean([0.9 * log_p[0, 0] + 0.05 * (log_p[0, 1] + log_p[0, 2]),
                       0.9 * log_p[1, 2] + 0.05 * (log_p[1, 0] + log_p[1, 1])])
  assert float(smoothed_cross_entropy(logits, labels, mask, 0.1)) == pytest.approx(expected, rel=1e-6)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert float(smoothed_cross_entropy(logits, labels, mask, 0.0)) == pytest.approx(float(plain), rel=1e-6)
  schedule = cosine_per_step(0.01, 100)
  assert [float(schedule(t)) for t in (0, 50, 100, 200)] == pytest.approx([0.01, 0.005, 0.0, 0.01], abs=1e-8)


# NFT.


def test_nft_clamp_bounds_are_the_released_values():
  """μ(l) = 0.8·exp(−0.5·l), l = 1…19: the values the released defaults give."""
  np.testing.assert_allclose(
      lower_bounds(19, 0.8, 0.5)[:6], [0.485, 0.294, 0.179, 0.108, 0.066, 0.040], atol=6e-4)
  assert float(lower_bounds(19, 0.8, 0.5)[-1]) == pytest.approx(0.8 * np.exp(-9.5), rel=1e-5)


def test_nft_masks_clamp_fold_and_freeze_the_rest():
  """A huge step drives each mask to its bound [μ(l), 1]; the scales become γ₀⊙m; every other
  parameter gets a zero update; ∂L/∂m = γ₀⊙∂L/∂γ reaches the base optimizer."""
  tx = neuron_masks(optax.sgd(1e3), r".*/scale", 0.8, 0.5)
  state = tx.init(TOY)
  grads = jax.tree.map(jnp.ones_like, TOY)  # descent pushes every m down (γ₀ > 0) or up (γ₀ < 0)
  updates, state = tx.update(grads, state, TOY)
  params = optax.apply_updates(TOY, updates)
  mu = np.asarray(lower_bounds(2, 0.8, 0.5))
  np.testing.assert_allclose(state.masks["bn1"]["scale"], [mu[0], 1.0, mu[0]], rtol=1e-6)
  np.testing.assert_allclose(state.masks["bn2"]["scale"], [mu[1], 1.0], rtol=1e-6)  # γ₀ = 0: no gradient
  np.testing.assert_allclose(params["bn1"]["scale"], np.asarray(TOY["bn1"]["scale"]) * [mu[0], 1, mu[0]], rtol=1e-6)
  for path in (("bn1", "bias"), ("linear", "kernel"), ("linear", "bias")):
    np.testing.assert_array_equal(params[path[0]][path[1]], TOY[path[0]][path[1]])
  small = neuron_masks(optax.sgd(0.1), r".*/scale", 0.8, 0.5)
  s_state = small.init(TOY)
  _, s_state = small.update(grads, s_state, TOY)
  np.testing.assert_allclose(s_state.masks["bn1"]["scale"], np.clip(1 - 0.1 * np.asarray(TOY["bn1"]["scale"]), 0, 1))


def test_nft_mask_penalty_reads_masks_from_params():
  """Σ‖1 − m‖₁ with m = γ/γ₀; zero at the start; tensors with γ₀ = 0 contribute nothing."""
  tx = neuron_masks(optax.sgd(0.1), r".*/scale")
  state = tx.init(TOY)
  assert float(mask_penalty(TOY, state)) == 0.0
  shrunk = {**TOY, "bn1": {**TOY["bn1"], "scale": TOY["bn1"]["scale"] * jnp.array([0.5, 1.0, 0.25])}}
  assert float(mask_penalty(shrunk, state)) == pytest.approx(0.5 + 0.75)


# FST.


def test_fst_gradient_and_norm_reset_after_every_step():
  """The update adds α·W₀ to the head kernel's gradient, and every step ends with ‖W‖ = ‖W₀‖
  although the head starts re-initialised."""
  config = FSTConfig(alpha=0.2, learning_rate=0.5, momentum=0.0)
  hparams = defenses.program("fst", None, None, config).hyperparams()
  shifted, _ = feature_shift(0.2, "linear/kernel").update(_grads(), feature_shift(0.2, "linear/kernel").init(TOY), TOY)
  np.testing.assert_allclose(shifted["linear"]["kernel"], _grads()["linear"]["kernel"] + 0.2 * TOY["linear"]["kernel"])
  np.testing.assert_array_equal(shifted["linear"]["bias"], _grads()["linear"]["bias"])
  tx = config.optimizer(hparams, 1)
  state = tx.init(TOY)
  params = config.warm_start(TOY, jax.random.key(3))
  target = np.linalg.norm(TOY["linear"]["kernel"])
  assert not np.isclose(np.linalg.norm(params["linear"]["kernel"]), target)
  for i in range(3):
    updates, state = tx.update(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
    assert np.linalg.norm(params["linear"]["kernel"]) == pytest.approx(target, rel=1e-5)


def test_fst_reinitialises_the_head_uniformly():
  """Kernel and bias ~ U(±1/√fan_in), the rest unchanged; an unknown head is named."""
  wide = {"linear": {"kernel": jnp.ones((400, 5)), "bias": jnp.ones(5)}, "conv": {"kernel": jnp.ones(3)}}
  out = reinitialise_head(wide, "linear", jax.random.key(0))
  kernel, bias = np.asarray(out["linear"]["kernel"]), np.asarray(out["linear"]["bias"])
  assert np.abs(kernel).max() <= 1 / 20 and np.abs(kernel).max() > 0.95 / 20
  assert abs(kernel.mean()) < 0.005 and np.abs(bias).max() <= 1 / 20 and len(np.unique(bias)) == 5
  np.testing.assert_array_equal(out["conv"]["kernel"], wide["conv"]["kernel"])
  with pytest.raises(ValueError, match="head='fc'.*conv, linear"):
    reinitialise_head(wide, "fc", jax.random.key(0))


# Super-FT.


def test_super_ft_cyclic_rate():
  """Base at t = 0 (the first step), peak 1 at t = 10, base at t = 20; peak 2 from the switch
  epoch on; linear in between."""
  schedule = cyclic_rate(0.03, 2.5, 0.05, steps_per_epoch=10, switch_epoch=4)
  values = [float(schedule(t)) for t in (0, 5, 10, 15, 20, 30, 40, 50)]
  assert values == pytest.approx([0.03, 1.265, 2.5, 1.265, 0.03, 2.5, 0.03, 0.05], rel=1e-5)
  config = SuperFTConfig()
  assert (config.lr_base, config.lr_max1, config.lr_max2, config.switch_epoch, config.epochs,
          config.batch_size) == (0.03, 2.5, 0.05, 40, 100, 128)


# FP.


def test_fp_prunes_exactly_k_and_keeps_the_last_passing_depth():
  """With features that each carry one class, pruning k features costs their classes: the depth
  kept is the last k whose accuracy drop stayed under the ratio (not the first that violated it)."""
  features = np.eye(10, dtype=np.float32).repeat(10, axis=0)  # 100 samples, sample i has feature i//10
  labels = np.arange(10).repeat(10)
  kernel, bias = np.eye(10, dtype=np.float32), np.zeros(10, np.float32)
  order = np.arange(10)
  depth, accuracies = prune_depth(features, order, kernel, bias, labels, step=1, acc_ratio=0.25)
  # Pruning k features leaves those samples at logit 0 everywhere: argmax 0, right only for class 0.
  np.testing.assert_allclose(accuracies, [1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
  assert depth == 3  # drop 0.2 < 0.25 at k = 3; k = 4 drops 0.3
  depth, _ = prune_depth(features, order, kernel, bias, labels, step=2, acc_ratio=0.25)
  assert depth == 2
  depth, _ = prune_depth(features, order, kernel, bias, labels, step=1, acc_ratio=0.99)
  assert depth == 9


def test_keep_pruned_holds_zeros_through_momentum_and_decay():
  tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9), keep_pruned("linear/kernel"))
  params = TOY
  state = tx.init(params)
  for i in range(3):
    updates, state = tx.update(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  assert float(params["linear"]["kernel"][2, 0]) == 0.0
  assert np.count_nonzero(params["linear"]["kernel"]) == 5
  assert not np.allclose(params["bn1"]["scale"], TOY["bn1"]["scale"])


# Registry, configs, threat model.


def test_registry_has_the_baselines():
  assert set(defenses.names()) == {"ft", "d3", "ft-sam", "nft", "fst", "super-ft", "fp", "nc",
                                   "i-bau", "anp", "nad", "sau"}
  nad = defenses.get("nad")
  assert (nad.teacher_epochs, nad.epochs, nad.betas, nad.power, nad.learning_rate,
          nad.weight_decay) == (10, 10, (500.0, 1000.0), 2.0, 0.01, 5e-4)
  from_json = defenses.get("nad", betas=[1.0, 2.0], layers=["conv2", "conv4"])  # lists, as in a config file
  assert (from_json.betas, from_json.layers) == ((1.0, 2.0), ("conv2", "conv4")) and hash(from_json)
  sau = defenses.get("sau")
  assert (sau.eps, sau.pgd_lr, sau.pgd_steps, sau.pgd_adv_weight, sau.pgd_share_weight,
          sau.clean_weight, sau.adv_weight, sau.shared_weight, sau.learning_rate, sau.epochs,
          sau.crop_padding, sau.train_mode) == (0.2, 0.2, 5, 0.01, 1.0, 1.0, 0.0, 1.0, 1e-4, 100, 0, False)
  assert defenses.get("ft-sam").rho == 2.0 and defenses.get("ft-sam").label_smoothing == 0.1
  nft = defenses.get("nft")
  assert (nft.clamp_alpha, nft.clamp_beta, nft.l1, nft.mixup_alpha, nft.learning_rate,
          nft.momentum) == (0.8, 0.5, 0.001, 1.0, 0.05, 0.95)
  assert (defenses.get("fst").alpha, defenses.get("fst").epochs) == (0.2, 10)
  assert (defenses.get("fp").acc_ratio, defenses.get("fp").prune_step) == (0.1, 0.01)


@pytest.mark.parametrize("name, field, value, match", [
    ("ft-sam", "rho", 0.0, "rho must be > 0"),
    ("ft-sam", "label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ("nft", "clamp_alpha", 1.5, r"clamp_alpha must be in \[0, 1\]"),
    ("nft", "clamp_alpha", 0.0, "clamp_alpha must be > 0"),
    ("i-bau", "fixed_point_iterations", 0, "fixed_point_iterations must be an integer ≥ 1"),
    ("fst", "momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("nft", "mixup_alpha", 0.0, "mixup_alpha must be > 0"),
    ("nft", "select", "", "select must be a non-empty"),
    ("fst", "alpha", -1.0, "alpha must be ≥ 0"),
    ("super-ft", "switch_epoch", -1, "switch_epoch must be an integer ≥ 0"),
    ("super-ft", "epochs", 0, "epochs must be an integer ≥ 1"),
    ("fp", "acc_ratio", 1.0, r"acc_ratio must be in \(0, 1\)"),
    ("fp", "holdout", 0.0, r"holdout must be in \(0, 1\)"),
    ("nc", "init_cost", 0.0, "init_cost must be > 0"),
    ("i-bau", "radius", 0.0, "radius must be > 0"),
    ("anp", "alpha", 1.5, r"alpha must be in \[0, 1\]"),
    ("anp", "pruning_step", 0.0, r"pruning_step must be in \(0, 1\)"),
    ("i-bau", "train_mode", True, "train_mode must be False"),
    ("nc", "nc_epochs", 0, "nc_epochs must be an integer ≥ 1"),
    ("nc", "cost_multiplier", 1.0, "cost_multiplier must be > 1"),
    ("nad", "teacher_epochs", 0, "teacher_epochs must be an integer ≥ 1"),
    ("nad", "power", 0.0, "power must be > 0"),
    ("nad", "betas", (), "betas must be a non-empty tuple of numbers ≥ 0"),
    ("nad", "betas", (500.0, -1.0), "betas must be a non-empty tuple of numbers ≥ 0"),
    ("nad", "layers", ("layer4_1",), r"layers must have one entry per beta \(2\)"),
    ("nad", "layers", ("", "x"), "layers must be module paths"),
    ("sau", "train_mode", True, "train_mode must be False"),
    ("sau", "eps", 1.5, r"eps must be in \[0, 1\]"),
    ("sau", "pgd_steps", 0, "pgd_steps must be an integer ≥ 1"),
    ("sau", "shared_weight", -1.0, "shared_weight must be ≥ 0"),
])
def test_baseline_configs_reject_invalid_fields(name, field, value, match):
  with pytest.raises(ValueError, match=match):
    defenses.get(name, **{field: value})


def test_no_defense_stage_takes_test_data():
  """Every config's own defend method takes exactly defend's inputs: model, variables, the
  reserved set and a key; no test data, trigger or target."""
  expected = ["self", "model", "variables", "images", "labels", "normalization", "key", "progress",
              "callback", "restore"]
  staged = [cls for cls in defenses.REGISTRY.values() if hasattr(cls, "defend")]
  assert {FPConfig, NCConfig, anp.ANPConfig, defenses.NADConfig} <= set(staged)
  for cls in staged:
    assert list(inspect.signature(cls.defend).parameters) == expected, cls


def test_staged_defenses_have_no_single_program():
  """FP, NC, ANP and NAD run in stages: asking for their program (e.g. to sweep it) is refused."""
  for name in ("fp", "nc", "anp", "nad"):
    with pytest.raises(ValueError, match=f"defense '{name}' runs in stages"):
      defenses.program(name, None, None)


def test_nft_and_ft_sam_run_in_their_programs():
  from d3jax.defenses.nft import NFTProgram
  from d3jax.engine.sharpness import SAMProgram
  assert type(defenses.program("nft", None, None)) is NFTProgram
  assert type(defenses.program("ft-sam", None, None)) is SAMProgram
  assert defenses.program("ft-sam", None, None, FTSAMConfig(rho=3.0)) == defenses.program("ft-sam", None, None)
  assert type(defenses.program("nft", None, None, NFTConfig(l1=0.1))) is NFTProgram


# NC.


def test_nc_anomaly_index_is_the_mad_statistic():
  """index = |L − median| / (1.4826·MAD); flagged: below the median and index > 2."""
  norms = np.array([10.0, 11.0, 9.0, 10.5, 9.5, 1.0])
  median = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - median))
  np.testing.assert_allclose(nc.anomaly_index(norms), np.abs(norms - median) / mad)
  assert nc.flagged_labels(norms, 2.0) == [5]
  assert nc.flagged_labels(np.array([10.0, 11.0, 9.0, 10.5, 9.5, 30.0]), 2.0) == []  # large: not flagged
  assert nc.flagged_labels(np.full(5, 3.0), 2.0) == []  # MAD 0, nothing deviates


def test_nc_stamp_and_squash():
  """The stamp mixes in pixel space with rounding and clipping; squash maps into [0, 1] (open in exact arithmetic)."""
  images = np.full((1, 2, 2, 1), 100, np.uint8)
  mask = np.array([[[0.0], [1.0]], [[0.5], [0.25]]], np.float32)
  pattern = np.array([[[1.0], [1.0]], [[0.0], [1.0]]], np.float32)
  np.testing.assert_array_equal(nc.stamp(images, mask, pattern)[0, ..., 0], [[100, 255], [50, 139]])
  assert float(nc.squash(jnp.float32(0.0))) == pytest.approx(0.5)
  assert 0 <= float(nc.squash(jnp.float32(-50.0))) < 1e-6 and 0.999 < float(nc.squash(jnp.float32(50.0))) <= 1


# i-BAU.


def _bilevel():
  """A tiny bilevel problem: Φ(δ, W) = δ − η·∇_δ[½‖Wδ − b‖² + ½λ‖δ‖²] (a contraction) and a
  smooth outer loss of both."""
  b, x = jnp.array([1.0, -2.0]), jnp.array([0.3, -0.1, 0.2])

  def inner_map(delta, params):
    return delta - 0.1 * jax.grad(lambda d: 0.5 * jnp.sum((params["w"] @ d - b) ** 2)
                                  + 0.05 * jnp.sum(d ** 2))(delta)

  def outer_loss(delta, params):
    return jnp.sum(jnp.tanh(params["w"] @ (x + delta))) + 0.1 * jnp.sum(params["w"] ** 2)

  return inner_map, outer_loss


def test_ibau_hypergradient_matches_finite_differences():
  """dL(δ*(W), W)/dW by K Neumann terms equals central differences of W ↦ L(δ*(W), W), δ* the
  fixed point; with K = 0 it is the partial derivative ∂L/∂W alone."""
  jax.config.update("jax_enable_x64", True)
  try:
    inner_map, outer_loss = _bilevel()
    params = {"w": jnp.array([[1.0, 0.5, -0.3], [0.2, -0.8, 0.6]], jnp.float64)}

    def fixed_point(p):
      return jax.lax.fori_loop(0, 3000, lambda _, d: inner_map(d, p), jnp.zeros(3, jnp.float64))

    delta = fixed_point(params)
    total = hypergradient(inner_map, outer_loss, delta, params, iterations=2000)["w"]
    numeric = np.zeros((2, 3))
    for i in range(2):
      for j in range(3):
        step = np.zeros((2, 3)); step[i, j] = 1e-5
        up, down = {"w": params["w"] + step}, {"w": params["w"] - step}
        numeric[i, j] = (outer_loss(fixed_point(up), up) - outer_loss(fixed_point(down), down)) / 2e-5
    np.testing.assert_allclose(total, numeric, rtol=1e-5, atol=1e-8)
    partial = jax.grad(outer_loss, argnums=1)(delta, params)["w"]
    np.testing.assert_allclose(hypergradient(inner_map, outer_loss, delta, params, 0)["w"], partial)
    assert not np.allclose(partial, numeric, atol=1e-3)  # the implicit term matters here
  finally:
    jax.config.update("jax_enable_x64", False)


def test_ibau_projection_onto_the_l2_ball():
  inside, outside = jnp.array([3.0, 4.0]), jnp.array([30.0, 40.0])
  np.testing.assert_allclose(project_l2(inside, 10.0), inside)
  np.testing.assert_allclose(project_l2(outside, 10.0), [6.0, 8.0], rtol=1e-6)


# ANP.


def test_anp_noisy_bn_and_pruning_by_masks():
  """The noisy BN is γ₀·(m + δ), β·(1 + ξ) on masked modules only; pruning zeroes γ where
  m ≤ threshold and keeps β; channels with γ₀ = 0 count as unmasked."""
  reference = {"bn1": {"scale": TOY["bn1"]["scale"], "bias": None}, "bn2": {"scale": None}, "linear": None}
  delta = {"bn1": {"scale": jnp.array([0.1, 0.2, -0.5])}}
  xi = {"bn1": {"scale": jnp.array([0.5, 0.0, -1.0])}}
  params = {**TOY, "bn1": {**TOY["bn1"], "scale": TOY["bn1"]["scale"] * 0.5}}  # m = 0.5
  noisy = anp._with_noise(params, reference, (delta, xi))
  np.testing.assert_allclose(noisy["bn1"]["scale"], np.asarray(TOY["bn1"]["scale"]) * (0.5 + np.array([0.1, 0.2, -0.5])))
  np.testing.assert_allclose(noisy["bn1"]["bias"], np.asarray(TOY["bn1"]["bias"]) * [1.5, 1.0, 0.0])
  np.testing.assert_array_equal(noisy["bn2"]["scale"], TOY["bn2"]["scale"])
  trained = {**TOY, "bn1": {**TOY["bn1"], "scale": TOY["bn1"]["scale"] * jnp.array([0.1, 0.5, 0.9])},
             "bn2": {"scale": jnp.array([0.3, 0.0])}}
  masks = anp.channel_masks(TOY, trained, r".*/scale")
  np.testing.assert_allclose(masks["bn1"]["scale"], [0.1, 0.5, 0.9], rtol=1e-6)
  np.testing.assert_allclose(masks["bn2"]["scale"], [0.1, 1.0], rtol=1e-6)
  pruned = anp.prune_by_masks(TOY, masks, 0.5)
  np.testing.assert_array_equal(pruned["bn1"]["scale"], [0.0, 0.0, 0.5])
  np.testing.assert_array_equal(pruned["bn2"]["scale"], [0.0, 0.0])
  np.testing.assert_array_equal(pruned["bn1"]["bias"], TOY["bn1"]["bias"])
  assert list(anp.ANPConfig().thresholds().round(2)) == [round(0.05 * i, 2) for i in range(19)]
