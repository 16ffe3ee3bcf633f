"""WaNet's per-batch poisoning (backdoor, noise-mode cross and clean parts) and its recipe."""
import jax
import numpy as np
import pytest

from d3jax.attacks import get
from d3jax.attacks.wanet import WaNetProgram, WaNetTraining, poison_batch
from d3jax.attacks.warp import warp as warp_eager
from d3jax.models import get_model
from d3jax.engine.train import Normalization


warp = jax.jit(warp_eager)


def _batch(n=20, shape=(8, 8, 1)):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, *shape), dtype=np.uint8), (np.arange(n) % 4).astype(np.int32)


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_poison_batch_parts(label_mode, rbg_key):
  images, labels = _batch()
  recipe = WaNetTraining(batch_size=20, ratio=0.2, target=3, label_mode=label_mode, num_classes=4)
  assert recipe.counts == (4, 8)
  poison = jax.jit(poison_batch, static_argnums=0)
  x, y = poison(recipe, images, labels, rbg_key)
  x, y = np.asarray(x), np.asarray(y)
  offsets = recipe.attack.offsets(8, 8)
  np.testing.assert_allclose(x[:4], np.asarray(warp(images[:4].astype(np.float32), offsets)), atol=1e-4)
  expected = np.full(4, 3) if label_mode == "all2one" else (labels[:4] + 1) % 4
  np.testing.assert_array_equal(y[:4], expected)
  np.testing.assert_array_equal(y[4:], labels[4:])  # cross and clean samples keep their labels
  np.testing.assert_array_equal(x[12:], images[12:])  # clean part untouched
  cross = x[4:12]
  plain = np.asarray(warp(images[4:12].astype(np.float32), offsets))
  assert not np.allclose(cross, plain, atol=1e-3)  # noisy grids differ from the backdoor grid
  assert np.abs(cross - plain).mean() < np.abs(cross - images[4:12]).mean() * 2
  again, _ = poison(recipe, images, labels, rbg_key)
  np.testing.assert_array_equal(np.asarray(again), x)


def test_wanet_recipe_errors_and_program_identity():
  with pytest.raises(ValueError, match="WaNet supports label_mode all2one, all2all"):
    WaNetTraining(label_mode="clean_label")
  with pytest.raises(ValueError, match="needs 120 warped samples per batch of 100"):
    WaNetTraining(batch_size=100, ratio=0.4)
  with pytest.raises(ValueError, match="target must be a class"):
    WaNetTraining(target=10)
  model = get_model("small_cnn", 4, width=4)
  norm = Normalization((0.5,), (0.5,))
  same = WaNetProgram(model, WaNetTraining(num_classes=4), norm)
  assert same == WaNetProgram(model, WaNetTraining(num_classes=4), norm)
  assert same != WaNetProgram(model, WaNetTraining(num_classes=4, target=1), norm)
  assert same != WaNetProgram(model, WaNetTraining(num_classes=4, attack=get("wanet", seed=1)), norm)
