"""The input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020): generators, losses, the batch's
backdoor and cross parts, determinism, config errors, and an end-to-end run on digits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import metrics
from d3jax.rundirs import checkpoint
from d3jax.engine import train
from d3jax.attacks import apply_trigger, backdoor_test_set, get
from d3jax.attacks.input_aware import (Generator, InputAwareTraining, blend, diversity_loss,
                                       poison_rows, source_rows, threshold)
from d3jax.attacks.training import AttackTrainConfig
from d3jax.models import get_model

NORM = train.Normalization((0.5,), (0.5,))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(16, 16, 3), (14, 10, 1)])
def test_generator_shapes_and_range(shape, rbg_key):
  """Both generators keep the image size (also sides not divisible by 2^depth); outputs lie in
  tanh(tanh(·))/2 + ½'s range, about (0.12, 0.88); the threshold maps into [0, 1]."""
  x = jax.random.normal(rbg_key, (2, *shape)) * 3.0
  for channels in (shape[-1], 1):
    net = Generator(channels, width=4, depth=2, conv="lax")
    variables = jax.jit(net.init)(rbg_key, x)
    out = np.asarray(jax.jit(net.apply)(variables, x))
    assert out.shape == (2, *shape[:2], channels)
    assert out.min() > 0.5 - np.tanh(1.0) / 2 - 1e-6 and out.max() < 0.5 + np.tanh(1.0) / 2 + 1e-6
  soft = np.asarray(threshold(jnp.linspace(-1.0, 2.0, 31)))
  assert soft.min() >= 0.0 and soft.max() <= 1.0 and np.all(np.diff(soft) >= 0)
  assert soft[0] < 1e-6 and soft[-1] > 1 - 1e-6


def test_diversity_loss_on_a_hand_example():
  """Pairs (0 vs 1 image, patterns 0 vs 0.5) and (0 vs 2, patterns 0 vs 0.25): RMS ratios 1/0.5
  and 2/0.25, mean 5; masking the second pair out leaves 2."""
  images = jnp.zeros((2, 2, 2, 1))
  others = jnp.stack([jnp.ones((2, 2, 1)), 2 * jnp.ones((2, 2, 1))])
  outputs = jnp.zeros((2, 2, 2, 1))
  other_outputs = jnp.stack([jnp.full((2, 2, 1), 0.5), jnp.full((2, 2, 1), 0.25)])
  assert float(diversity_loss(images, others, outputs, other_outputs)) == pytest.approx(5.0, rel=1e-5)
  valid = jnp.array([True, False])
  assert float(diversity_loss(images, others, outputs, other_outputs, valid)) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_cross_samples_use_another_images_pattern(label_mode):
  """Backdoor rows get their own pattern and the poisoned label; cross rows get the pattern and
  mask of the image half a batch away (never their own) and keep their labels; the rest is clean."""
  recipe = InputAwareTraining(batch_size=20, ratio=0.1, target=3, label_mode=label_mode,
                              num_classes=4, attack=get("input_aware", cross_ratio=0.15))
  assert recipe.counts == (2, 3)
  rows = np.asarray(source_rows(20, *recipe.counts))
  np.testing.assert_array_equal(rows, [0, 1, 12, 13, 14])
  x = jnp.arange(20, dtype=jnp.float32)[:, None, None, None] * jnp.ones((20, 4, 4, 1))
  labels = jnp.arange(20, dtype=jnp.int32) % 4
  patterns = 100.0 + x[rows]  # each source row's own "pattern"
  masks = jnp.ones((5, 4, 4, 1))
  inputs, poisoned = poison_rows(x, labels, patterns, masks, recipe)
  inputs, poisoned = np.asarray(inputs), np.asarray(poisoned)
  np.testing.assert_array_equal(inputs[:5, 0, 0, 0], [100, 101, 112, 113, 114])
  np.testing.assert_array_equal(inputs[5:], np.asarray(x[5:]))
  expected = [3, 3] if label_mode == "all2one" else [1, 2]
  np.testing.assert_array_equal(poisoned[:2], expected)
  np.testing.assert_array_equal(poisoned[2:], np.asarray(labels[2:]))
  half = np.asarray(blend(x[:1], patterns[:1], 0.5 * masks[:1]))
  assert half[0, 0, 0, 0] == pytest.approx(50.0)


def _tiny_program():
  """Input-aware on 8×8×1 images, 2 epochs, width-2 nets (shared by the tests below, so the
  jitted epochs compile once)."""
  model = get_model("small_cnn", 10, width=2, conv="lax")  # "lax": compiles faster at this size
  recipe = AttackTrainConfig(epochs=2, batch_size=20, crop_padding=1)
  attack = get("input_aware", width=2, depth=1, mask_epochs=1, conv="lax")
  return attack.program(model, recipe, NORM, ratio=0.1, target=0, label_mode="all2one",
                        num_classes=10)


def _tiny_run(tiny_set, key, **kwargs):
  program = _tiny_program()
  images, labels = tiny_set
  variables = train.init_variables(program.model, (8, 8, 1), key)
  state, history = train.train_state(program, variables, images, labels, key, progress=False,
                                     **kwargs)
  return program, state, history


@pytest.mark.slow
def test_training_is_deterministic_under_a_key(tiny_set, rbg_key):
  """Same key → identical classifier, generators and trigger; another key → different ones; mask
  pre-training (stage 1) changed the mask generator and stage 2 the pattern generator."""
  program, state, history = _tiny_run(tiny_set, rbg_key)
  _, again, _ = _tiny_run(tiny_set, rbg_key)
  _, other, _ = _tiny_run(tiny_set, jax.random.key(1, impl="rbg"))
  leaves = lambda s: jax.tree.leaves((s.params, s.generator, s.mask))  # noqa: E731
  for a, b in zip(leaves(state), leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(leaves(state), leaves(other)))
  fresh = train.init_state(program, train.init_variables(program.model, (8, 8, 1), rbg_key), 40,
                           rbg_key)
  for trained, initial in ((state.mask, fresh.mask), (state.generator, fresh.generator)):
    assert any(not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(trained["params"]), jax.tree.leaves(initial["params"])))
  assert set(history) == {"loss", "cross_entropy", "diversity"} and np.isfinite(history["loss"]).all()
  images = tiny_set[0]
  triggered = apply_trigger(program.trigger(state, (8, 8, 1)), images)
  assert triggered.dtype == np.uint8 and triggered.shape == images.shape
  np.testing.assert_array_equal(triggered, apply_trigger(program.trigger(again, (8, 8, 1)), images))


@pytest.mark.slow
def test_resume_matches_and_does_not_pretrain_masks_again(tiny_set, rbg_key, tmp_path):
  """Interrupted after epoch 1, checkpointed (orbax) and resumed: the generators, masks and
  classifier equal an uninterrupted run's (mask pre-training is not run again on resume)."""
  _, whole, _ = _tiny_run(tiny_set, rbg_key)
  with checkpoint.EpochCheckpoints(tmp_path) as saved:
    def stop(epoch, state, metrics):
      saved.save(epoch + 1, state)
      raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      _tiny_run(tiny_set, rbg_key, callback=stop)
    _, resumed, history = _tiny_run(tiny_set, rbg_key, restore=saved.restore)
  assert history["loss"].shape == (1,)
  for a, b in zip(jax.tree.leaves((whole.params, whole.generator, whole.mask)),
                  jax.tree.leaves((resumed.params, resumed.generator, resumed.mask))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("options, message", [
    ({"width": 0}, r"^input_aware width must be an integer ≥ 1, got 0\.$"),
    ({"mask_epochs": -1}, r"^input_aware mask_epochs must be an integer ≥ 0, got -1\.$"),
    ({"cross_ratio": 1.0}, r"^input_aware cross_ratio must be in \[0, 1\), got 1\.0\.$"),
    ({"lambda_div": -1.0}, r"^input_aware lambda_div must be ≥ 0, got -1\.0\.$"),
    ({"mask_density": 2.0}, r"^input_aware mask_density must be in \[0, 1\], got 2\.0\.$"),
    ({"gamma": 0.0}, r"^input_aware gamma must be in \(0, 1\], got 0\.0\.$"),
    ({"conv": "fft"}, r"^input_aware conv must be one of auto, lax, im2col, winograd, got 'fft'\.$"),
    ({"mask_milestones": "10,x"}, r"^input_aware mask_milestones must be comma-separated epochs ≥ 1, got '10,x'\.$"),
])
def test_config_errors(options, message):
  with pytest.raises(ValueError, match=message):
    get("input_aware", **options)


def test_milestones_parse():
  assert get("input_aware", mask_milestones=5).mask_milestones == "5"
  assert get("input_aware", generator_milestones="").generator_milestones == ""


def test_recipe_errors():
  with pytest.raises(ValueError, match=r"^input_aware supports label_mode all2one, all2all, got 'clean_label'\.$"):
    InputAwareTraining(label_mode="clean_label")
  with pytest.raises(ValueError, match=r"^input_aware target must be a class in \[0, 10\), got 10\.$"):
    InputAwareTraining(target=10)
  with pytest.raises(ValueError, match=r"give 80 triggered samples per batch of 100, more than half"):
    InputAwareTraining(batch_size=100, ratio=0.4, attack=get("input_aware", cross_ratio=0.4))
  with pytest.raises(ValueError, match=r"trained together with the model"):
    get("input_aware").trigger((8, 8, 1))


@pytest.mark.slow
def test_backdoor_is_learned_on_digits(digits, rbg_key):
  """Digits, width-8 small CNN, width-4 one-scale generators, 1 mask epoch + 6 epochs at
  p_a = 0.2 and mask density 0.1 (16×16 images have few pixels): each image's own trigger sends
  it to the target (ASR well above the 10% of chance), clean accuracy stays, and another image's
  trigger mostly does not (the cross-trigger mode)."""
  model = get_model("small_cnn", digits.num_classes, width=8)
  norm = train.Normalization(digits.mean, digits.std)
  recipe = AttackTrainConfig(epochs=6, batch_size=64, learning_rate=0.1, cosine_t_max=6, crop_padding=0)
  attack = get("input_aware", width=4, depth=1, mask_epochs=1, mask_density=0.1, conv="lax")
  program = attack.program(model, recipe, norm, ratio=0.2, target=0, label_mode="all2one",
                           num_classes=digits.num_classes)
  state, _ = train.train_state(program, train.init_variables(model, digits.image_shape, rbg_key),
                               digits.x_train, digits.y_train, rbg_key, progress=False)
  trigger = program.trigger(state, digits.image_shape)
  bd_test = backdoor_test_set(digits.x_test, digits.y_test, trigger, num_classes=digits.num_classes)
  v = state.variables
  measured = metrics.summarize(train.predict(model, v, digits.x_test, norm), digits.y_test,
                               train.predict(model, v, bd_test.x, norm), bd_test.y, bd_test.y_orig)
  print(f"input_aware digits: {measured}")
  assert measured.asr >= 0.6 and measured.acc >= 0.85, measured
  # cross-trigger: image i blended with the pattern and mask of image i + 1 keeps its class
  x = jnp.asarray(digits.x_test[digits.y_test != 0])
  mean, std = jnp.asarray(norm.mean), jnp.asarray(norm.std)
  pattern_net, mask_net = attack.generators(1)
  xn = (x / 255.0 - mean) / std
  patterns = (pattern_net.apply(state.generator, xn) - mean) / std
  masks = threshold(mask_net.apply(state.mask, xn))
  crossed = blend(xn, jnp.roll(patterns, 1, 0), jnp.roll(masks, 1, 0))
  pixels = jnp.floor(jnp.clip((crossed * std + mean) * 255.0, 0, 255)).astype(jnp.uint8)
  cross_asr = float(np.mean(train.predict(model, v, np.asarray(pixels), norm) == 0))
  print(f"input_aware digits: cross-trigger ASR {cross_asr:.3f}")
  assert cross_asr < measured.asr / 2, (cross_asr, measured)
