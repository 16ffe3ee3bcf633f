"""SSBA with pre-generated poisoned images (BackdoorBench's resource arrays): replacement by index
through ``d3jax attack``, the clear errors on bad files, and that such a backdoor is learned."""
import jax
import numpy as np
import pytest

from d3jax import cli, metrics
from d3jax.rundirs import runs
from d3jax.engine import train
from d3jax.attacks import get, poison_dataset
from d3jax.attacks.poison import Replacement
from d3jax.attacks.training import AttackTrainConfig, attack_sets, build_trigger, train_backdoored
from d3jax.models import get_model

TINY = ["--dataset", "digits", "--model-options", "width", "4", "--epochs", "1", "--batch-size", "64",
        "--eval-every", "0", "--quiet"]


def _files(digits, tmp_path):
  """A sample-specific "poisoning" (each image inverted), train as .npy and test as .npz."""
  train_path, test_path = tmp_path / "train.npy", tmp_path / "test.npz"
  np.save(train_path, 255 - digits.x_train)
  np.savez(test_path, images=255 - digits.x_test)
  return str(train_path), str(test_path)


@pytest.mark.slow
def test_pregenerated_images_replace_samples_by_index(digits, tmp_path, rbg_key):
  """The drawn training samples take their row of the train file (no encoder is trained), the
  rest stay clean; the backdoor test set is the test file's non-target rows; a run stores it."""
  train_file, test_file = _files(digits, tmp_path)
  config = get("ssba", train_file=train_file, test_file=test_file)
  assert config.pregenerated and build_trigger(config, digits, model=None, normalization=None,
                                               config=None, target=0, key=rbg_key) is None
  poisoned, bd_test = attack_sets(config, None, digits, ratio=0.1, target=0, label_mode="all2one",
                                  key=rbg_key)
  rows = poisoned.is_poison
  assert rows.sum() == round(0.1 * len(rows))
  np.testing.assert_array_equal(poisoned.x[rows], 255 - digits.x_train[rows])
  np.testing.assert_array_equal(poisoned.x[~rows], digits.x_train[~rows])
  assert (poisoned.y[rows] == 0).all()
  keep = digits.y_test != 0
  np.testing.assert_array_equal(bd_test.x, 255 - digits.x_test[keep])
  np.testing.assert_array_equal(bd_test.y_orig, digits.y_test[keep])
  out = tmp_path / "run"
  assert cli.main(["attack", "--out", str(out), "--attack", "ssba", *TINY, "--attack-options",
                   "train_file", train_file, "test_file", test_file]) == 0
  np.testing.assert_array_equal(runs.load(out).backdoored.backdoor_test.x, bd_test.x)


def test_bad_pregenerated_files_are_refused(digits, tmp_path):
  train_file, test_file = _files(digits, tmp_path)
  with pytest.raises(ValueError, match=r"^SSBA train_file and test_file go together"):
    get("ssba", train_file=train_file)
  short = tmp_path / "short.npy"
  np.save(short, digits.x_train[:10])
  with pytest.raises(ValueError, match=r"holds uint8 images of shape \(10, 16, 16, 1\); expected "
                                       r"uint8 of shape \(1433, 16, 16, 1\)"):
    get("ssba", train_file=str(short), test_file=test_file).load_pregenerated(digits)
  floats = tmp_path / "floats.npy"
  np.save(floats, digits.x_test.astype(np.float32) / 255)
  with pytest.raises(ValueError, match=r"^SSBA test_file .* holds float32 images"):
    get("ssba", train_file=train_file, test_file=str(floats)).load_pregenerated(digits)
  two = tmp_path / "two.npz"
  np.savez(two, a=digits.x_test, b=digits.x_test)
  with pytest.raises(ValueError, match=r"must hold one array, found \['a', 'b'\]"):
    get("ssba", train_file=train_file, test_file=str(two)).load_pregenerated(digits)
  with pytest.raises(ValueError, match=r"cannot be read as \.npy/\.npz"):
    get("ssba", train_file=str(tmp_path / "missing.npy"), test_file=test_file).load_pregenerated(digits)
  with pytest.raises(ValueError, match=r"replace samples by index"):
    Replacement(digits.x_test, "ssba")(digits.x_test)


@pytest.mark.slow
def test_a_pregenerated_backdoor_is_learned(digits, tmp_path, rbg_key):
  """Digits, width-8 small CNN, 5 epochs, 10% of the training set replaced by its pre-generated
  copies: the backdoor is learned (ASR far above the 10% of chance)."""
  train_file, test_file = _files(digits, tmp_path)
  images = get("ssba", train_file=train_file, test_file=test_file).load_pregenerated(digits)
  poisoned, bd_test = poison_dataset(digits, images[0], ratio=0.1, key=rbg_key, test_trigger=images[1])
  model = get_model("small_cnn", digits.num_classes, width=8)
  norm = train.Normalization(digits.mean, digits.std)
  recipe = AttackTrainConfig(epochs=5, batch_size=64, learning_rate=0.1, cosine_t_max=5, crop_padding=0)
  variables, _ = train_backdoored(model, poisoned, norm, recipe, jax.random.fold_in(rbg_key, 1),
                                  progress=False)
  measured = metrics.summarize(train.predict(model, variables, digits.x_test, norm), digits.y_test,
                               train.predict(model, variables, bd_test.x, norm), bd_test.y, bd_test.y_orig)
  print(f"ssba pre-generated digits: {measured}")
  assert measured.asr >= 0.8 and measured.acc >= 0.85, measured
