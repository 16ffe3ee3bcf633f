"""NAD's and SAU's mathematics on hand examples and toy models (no long training): attention maps
and their normalisation, the distillation term vanishing when teacher and student agree, SAU's
shared-adversarial losses, its PGD's constraints, and the layers NAD reads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d3jax import defenses
from d3jax.engine import train
from d3jax.defenses.features import apply_recording
from d3jax.defenses.nad import NADConfig, NADProgram, attention_loss, attention_map, default_layers
from d3jax.defenses.sau import SAUProgram, js_divergence, pgd_loss, shared_loss, shared_pgd
from d3jax.models import get_model
from d3jax.optim import keep_reference

NORM = train.Normalization((0.5,), (0.5,))


# NAD.


def test_attention_map_sums_powers_over_channels_and_normalises():
  """A(F) = Σ_c |F_c|^p per position over its L2 norm (+1e-6): energies 3 and 4 give 0.6, 0.8;
  p = 1 sums absolute values; a rescaled F has the same map; a 1×1 map is 1."""
  features = jnp.array([[[[1.0, -1.0, 1.0], [0.0, 2.0, 0.0]]]])  # (1, 1, 2, 3)
  np.testing.assert_allclose(attention_map(features, 2.0), [[3 / (5 + 1e-6), 4 / (5 + 1e-6)]], rtol=1e-6)
  np.testing.assert_allclose(attention_map(features, 1.0), [[3, 2] / (np.sqrt(13) + 1e-6)], rtol=1e-6)
  np.testing.assert_allclose(attention_map(7.0 * features, 2.0), attention_map(features, 2.0), rtol=1e-5)
  flat = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 6, 3)), jnp.float32)
  maps = attention_map(flat, 2.0)
  assert maps.shape == (4, 30)
  np.testing.assert_allclose(np.linalg.norm(maps, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(attention_map(flat[:, 0, 0], 2.0), 1.0, rtol=1e-5)  # the pooled term
  assert np.all(np.isfinite(jax.grad(lambda f: attention_map(f, 2.0).sum())(jnp.zeros((1, 2, 2, 3)))))


def test_attention_loss_is_the_weighted_mean_squared_map_difference():
  """Σ_k β_k·mean over positions of (A_s − A_t)², averaged over the valid samples only; zero
  for equal features; no gradient flows into the teacher."""
  rng = np.random.default_rng(1)
  student, teacher = ([jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((3, 4, 4, 2), (3, 2, 2, 5))]
                      for _ in range(2))
  mask = jnp.array([True, True, False])
  betas = jnp.array([500.0, 1000.0])
  expected = sum(b * np.mean(np.mean((attention_map(s, 2.0) - attention_map(t, 2.0))[:2] ** 2, axis=-1))
                 for b, s, t in zip(betas, student, teacher))
  assert float(attention_loss(student, teacher, betas, 2.0, mask)) == pytest.approx(float(expected), rel=1e-5)
  assert float(attention_loss(student, student, betas, 2.0, mask)) == 0.0
  teacher_grad = jax.grad(lambda t: attention_loss(student, t, betas, 2.0, mask))(teacher)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in teacher_grad)


def test_nad_step_equals_plain_fine_tuning_when_teacher_is_student(model, variables, tiny_set, rbg_key):
  """With the teacher equal to the student (eval mode, so both see the same features) the
  distillation term is 0: NAD's step is the plain CE step of the same recipe. A different teacher
  changes the loss."""
  x, y = map(jnp.asarray, tiny_set)
  config = NADConfig(batch_size=8, crop_padding=0, train_mode=False, layers=("conv2", "conv4"))
  nad, plain = NADProgram(model, config, NORM), train.Program(model, config, NORM)
  batch = train.Batch(x[:8].astype(jnp.uint8), y[:8], jnp.ones(8, bool))
  state = nad.init(variables, 40, rbg_key)
  step = jax.jit(nad.step)
  nad_state, nad_metrics = step(state, batch)
  plain_state, plain_metrics = jax.jit(plain.step)(plain.init(variables, 40, rbg_key), batch)
  assert float(nad_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nad_state.params, plain_state.params)
  other = train.init_variables(model, (8, 8, 1), jax.random.fold_in(rbg_key, 5))
  _, shifted = step(state.replace(teacher=other), batch)
  assert float(shifted["loss"]) > float(plain_metrics["loss"]) + 1e-4


def test_nad_default_layers_are_read_once_per_forward_pass():
  """PreAct-ResNet18 distils stages 3 and 4, the small CNN its two stages' last BN; any other
  model needs explicit layers; a layer that does not exist is named in the error."""
  resnet = get_model("preact_resnet18", 10, width=4)
  cnn = get_model("small_cnn", 10, width=4)
  assert default_layers(resnet) == ("layer3_1", "layer4_1") and default_layers(cnn) == ("bn2", "bn4")
  with pytest.raises(ValueError, match=r"NAD has no default layers for VGG \(it declares no "
                     r"attention_layers\); set layers"):
    default_layers(get_model("vgg11", 10, width=4, small_input=True))
  with pytest.raises(ValueError, match="NAD has no default layers for Dense"):
    default_layers(nn.Dense(3))  # a model without the attribute at all
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), x))
  _, (f3, f4) = jax.eval_shape(
      lambda v: apply_recording(resnet, v, x, default_layers(resnet), train=False), variables)
  assert f3.shape == (2, 4, 4, 16) and f4.shape == (2, 2, 2, 32)
  with pytest.raises(ValueError, match="layer 'layer5_0' was called 0 times"):
    jax.eval_shape(lambda v: apply_recording(resnet, v, x, ("layer5_0",), train=False), variables)
  # A whole NAD step on PreAct-ResNet18 in train mode traces (shapes only, nothing compiled).
  program = NADProgram(resnet, NADConfig(batch_size=2), train.Normalization((0.5,) * 3, (0.5,) * 3))
  batch = train.Batch(jnp.zeros((2, 16, 16, 3), jnp.uint8), jnp.zeros(2, jnp.int32), jnp.ones(2, bool))
  state = jax.eval_shape(lambda v: program.init(v, 2, jax.random.key(0, impl="rbg")), variables)
  _, metrics = jax.eval_shape(program.step, state, batch)
  assert metrics["loss"].shape == ()


# SAU.


def test_sau_shared_loss_on_a_hand_example():
  """Only samples whose reference prediction on x' is wrong and differs from its prediction on x
  count: with p_c = 1/2 the term is 2·log 2 (each half log 2), divided by 2B."""
  adv_logits = jnp.array([[0.0, 0.0, np.log(2.0)], [5.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
  ref_adv_pred, ref_clean_pred, labels = jnp.array([2, 1, 2]), jnp.array([0, 0, 2]), jnp.array([0, 1, 1])
  mask = jnp.ones(3, bool)
  expected = (-2 * np.log(0.5 + 1e-6)) / 2 / 3
  assert float(shared_loss(adv_logits, ref_adv_pred, ref_clean_pred, labels, mask)) == pytest.approx(expected, rel=1e-5)
  assert float(shared_loss(adv_logits, ref_adv_pred, ref_clean_pred, labels, jnp.array([False, True, True]))) == 0.0
  # Clamps: p_c below 0.001 contributes a constant (no gradient).
  tiny = jnp.array([[20.0, 0.0, -20.0]])
  grad = jax.grad(lambda l: shared_loss(l, jnp.array([2]), jnp.array([0]), jnp.array([0]), jnp.ones(1, bool)))(tiny)
  assert float(jnp.abs(grad).max()) == 0.0


def test_sau_pgd_loss_on_a_hand_example():
  """Shared samples (both models fooled to one label) add nothing; a sample the model still gets
  right adds −CE/(2B) to L_adv; a non-shared one adds JS/B to L_share. JS of disjoint one-hots is
  log 2, of equal distributions 0."""
  logits, ref_logits = jnp.array([[0.0, 5.0], [3.0, 0.0]]), jnp.array([[0.0, 5.0], [0.0, 3.0]])
  clean, ref_clean, labels, mask = jnp.array([0, 0]), jnp.array([0, 0]), jnp.array([0, 0]), jnp.ones(2, bool)
  ce = float(optax.softmax_cross_entropy_with_integer_labels(logits[1], 0))
  js = float(js_divergence(jax.nn.softmax(logits[1]), jax.nn.softmax(ref_logits[1])))
  value = pgd_loss(logits, ref_logits, clean, ref_clean, labels, mask, 0.01, 1.0)
  assert float(value) == pytest.approx(0.01 * (-ce / 4) + js / 2, rel=1e-5)
  assert float(js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))) == pytest.approx(np.log(2), rel=1e-5)
  assert float(js_divergence(jnp.array([0.3, 0.7]), jnp.array([0.3, 0.7]))) == pytest.approx(0.0, abs=1e-7)


def test_sau_pgd_stays_in_the_ball_and_the_pixel_range(model, variables, tiny_set):
  """δ moves, every |δ| ≤ ε, x + δ stays in [0, 1] (also at black and white pixels), and some
  entries sit on the ball's boundary."""
  images, labels = tiny_set
  x = jnp.asarray(images[:8], jnp.float32) / 255.0
  x = x.at[0].set(0.0).at[1].set(1.0)
  mean, std = jnp.asarray(NORM.mean), jnp.asarray(NORM.std)

  def logits_of(params, z):
    return model.apply({**variables, "params": params}, (z - mean) / std, train=False)

  hparams = {"eps": 0.2, "pgd_lr": 0.05, "pgd_adv_weight": 0.01, "pgd_share_weight": 1.0}
  delta = jax.jit(lambda p: shared_pgd(logits_of, p, p, x, jnp.asarray(labels[:8]), jnp.ones(8, bool),
                                       hparams, 5))(variables["params"])
  assert float(jnp.abs(delta).max()) <= 0.2 + 1e-6
  assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
  assert np.any(np.isclose(np.abs(delta), 0.2)) and np.any(~np.isclose(np.abs(delta), 0.2))
  assert float(delta[0].min()) >= 0.0 and float(delta[1].max()) <= 0.0  # black can only brighten


def test_sau_program_keeps_the_reference_and_is_sweepable():
  """SAU is one program (sweepable): two configs differing only in hyperparameters share it; its
  optimizer state holds the starting params, which updates never change."""
  assert type(defenses.program("sau", None, None)) is SAUProgram
  assert defenses.program("sau", None, None, defenses.get("sau", eps=0.1)) == defenses.program("sau", None, None)
  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax.chain(optax.sgd(0.1), keep_reference())
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params)
  np.testing.assert_allclose(updates["w"], [-0.1, -0.1])
  np.testing.assert_array_equal(state[-1].reference["w"], params["w"])
