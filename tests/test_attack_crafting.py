"""LF's universal perturbation and TrojanNN's trigger, crafted against a tiny random MLP (any
Linen classifier with a Dense head named ``linear`` will do)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax.engine import train
from d3jax.attacks import CleanModel, get
from d3jax.attacks.clean import unit
from d3jax.attacks.lf import generate_pattern, targeted_deepfool
from d3jax.attacks.ssba import Encoded, train_encoder
from d3jax.attacks.training import AttackTrainConfig, build_trigger
from d3jax.attacks.trojannn import layer_input, mask_image, optimise_trigger, select_neurons
from d3jax.data.dataset import Dataset

SHAPE = (16, 16, 1)


class TinyMLP(nn.Module):
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Dense(8, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name="linear")(x)


@pytest.fixture(scope="module")
def clean(rbg_key):
  model = TinyMLP()
  variables = model.init(rbg_key, jnp.zeros((1, *SHAPE)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (60, *SHAPE), dtype=np.uint8)
  return CleanModel(model, variables, train.Normalization((0.5,), (0.25,)), images,
                    (np.arange(60) % 4).astype(np.int32))


def test_targeted_deepfool_reaches_the_target(clean):
  fool = jax.jit(lambda x, target, steps: targeted_deepfool(clean, x, target, 0.02, steps))
  for image in unit(clean.images[:3]):
    start = int(jnp.argmax(clean.logits(image[None])[0]))
    target = (start + 1) % 4
    r, reached = fool(image, target, 50)
    assert bool(reached)
    assert int(jnp.argmax(clean.logits((image + r)[None])[0])) == target
    _, stuck = fool(image, target, 0)  # no iteration allowed
    assert not bool(stuck)


@pytest.mark.slow
def test_lf_pattern_is_low_frequency_bounded_and_deterministic(clean, rbg_key):
  config = get("lf", num_images=8, eval_per_class=2, max_passes=2, max_iter=20, filter_taps=9,
               filter_sigma=2.0)
  pattern, rates = generate_pattern(config, clean.checked(SHAPE, "LF"), 1, rbg_key)
  assert pattern.dtype == np.uint8 and pattern.shape == SHAPE
  assert pattern.min() == 0 and 50 <= pattern.max() <= 51  # min-max rescaled to [0, 0.2]·255
  assert 1 <= len(rates) <= 2 and all(0 <= rate <= 1 for rate in rates)
  smoothness = np.abs(np.diff(pattern.astype(float), axis=0)).mean()
  assert smoothness < 6  # i.i.d. values over 0..51 would differ by ≈ 17 between neighbours
  again, _ = generate_pattern(config, clean, 1, rbg_key)
  np.testing.assert_array_equal(pattern, again)
  trigger = config.trigger(SHAPE, clean=clean, target=1, key=rbg_key)
  np.testing.assert_array_equal(trigger.pattern, pattern.astype(np.float32))
  with pytest.raises(ValueError, match="LF needs 100 crafting images"):
    generate_pattern(get("lf"), clean, 1, rbg_key)
  with pytest.raises(ValueError, match="clean model's images have shape"):
    config.trigger((32, 32, 3), clean=clean, key=rbg_key)


def test_trojannn_neurons_are_the_strongest_head_inputs(clean):
  kernel = np.abs(np.asarray(clean.variables["params"]["linear"]["kernel"]))
  neurons = select_neurons(get("trojannn", num_neurons=3), clean)
  np.testing.assert_array_equal(neurons, np.argsort(-kernel.sum(1))[:3])
  features = layer_input(clean, "linear", unit(clean.images[:3]))
  params = clean.variables["params"]["linear"]
  np.testing.assert_allclose(features @ params["kernel"] + params["bias"],
                             clean.logits(unit(clean.images[:3])), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="not a top-level Dense layer"):
    select_neurons(get("trojannn", layer="conv9"), clean)
  with pytest.raises(ValueError, match="at most the 8 inputs"):
    select_neurons(get("trojannn", num_neurons=9), clean)


def test_trojannn_trigger_drives_neurons_inside_the_mask(clean):
  config = get("trojannn", steps=30, target_value=5.0)
  start = mask_image(config, SHAPE)
  trigger, log = optimise_trigger(config, clean, start)
  keep = start > 0
  assert trigger.dtype == np.uint8 and np.all(trigger[~keep] == 0)
  assert trigger[keep].min() >= np.floor(0.7 * 255) - 1  # within ε = 0.3 of the white mask
  assert log["steps"] <= 30
  neurons = log["neurons"]

  def cost(image):
    features = layer_input(clean, "linear", unit(image[None]))[0]
    return float(jnp.sum((features[np.array(neurons)] - 5.0) ** 2))

  assert cost(trigger) < cost(np.floor(start * 255).astype(np.uint8))
  built = get("trojannn", steps=30, target_value=5.0, wrap=True).trigger(SHAPE, clean=clean)
  assert built.wrap and built.name == "trojannn"
  np.testing.assert_array_equal(built.pattern, trigger.astype(np.float32))


@pytest.mark.slow
def test_ssba_encoder_hides_bits_in_sample_specific_residuals(rbg_key):
  images = np.random.default_rng(1).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
  config = get("ssba", bits=8, width=8, steps=200, batch_size=16, l2_weight=0.1)
  params, log = train_encoder(config, images, rbg_key)
  assert log["bit_accuracy"] >= 0.6  # chance is 0.5; the decoder reads the hidden bits
  trigger = Encoded((8, 8, 1), params, config.secret(), config.width)
  out = np.asarray(trigger(images[:4]))
  assert out.dtype == np.uint8 and out.shape == (4, 8, 8, 1)
  residual = out.astype(int) - images[:4]
  assert np.abs(residual).mean() > 1
  assert not np.array_equal(residual[0], residual[1])  # sample-specific
  np.testing.assert_array_equal(np.asarray(trigger(images[:4])), out)
  np.testing.assert_array_equal(config.secret(), get("ssba", bits=8).secret())
  with pytest.raises(ValueError, match="SSBA trains its encoder on clean images"):
    config.trigger((8, 8, 1))


def test_build_trigger_uses_what_each_attack_crafts_on(clean, rbg_key):
  dataset = Dataset(clean.images, clean.labels, clean.images[:8], clean.labels[:8], num_classes=4,
                    mean=(0.5,), std=(0.25,))
  common = dict(model=clean.model, normalization=clean.normalization,
                config=AttackTrainConfig(epochs=1), target=1, key=rbg_key)
  assert get("badnets").crafts_on == "nothing"
  assert build_trigger(get("badnets"), dataset, **common).name == "badnets"
  given = build_trigger(get("trojannn", steps=3), dataset, clean=clean, **common)
  trigger, _ = optimise_trigger(get("trojannn", steps=3), clean, mask_image(get("trojannn"), SHAPE))
  np.testing.assert_array_equal(given.pattern, trigger.astype(np.float32))
  assert get("lf").crafts_on == "model" and get("lf", pattern_path="p.npy").crafts_on == "nothing"
  assert get("ssba").crafts_on == "images" and get("adaptive", base="lf").crafts_on == "model"
