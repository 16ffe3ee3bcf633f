"""Shared, generic test fixtures (keys and tiny data sets).

Keys use the ``rbg`` PRNG implementation: it compiles much faster than threefry on XLA:CPU,
and the library must accept any typed key anyway.
"""
import jax
import numpy as np
import pytest

from d3jax import metrics
from d3jax.engine import train
from d3jax.attacks import BadNets, poison_dataset
from d3jax.attacks.training import AttackTrainConfig, train_backdoored
from d3jax.data import draw_reserved, subset
from d3jax.models import get_model


@pytest.fixture(scope="session")
def rbg_key():
  """A typed ``rbg`` PRNG key (seed 0)."""
  return jax.random.key(0, impl="rbg")


@pytest.fixture(scope="session")
def tiny_set():
  """Synthetic (images, labels): 40 uint8 images 8×8×1 and int32 labels over 10 classes."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  labels = (np.arange(40) % 10).astype(np.int32)
  return images, labels


@pytest.fixture(scope="session")
def digits():
  """The embedded digits dataset (16×16×1 uint8, 1433 train / 364 test), seed 0."""
  from d3jax.data import load_dataset
  return load_dataset("digits")


@pytest.fixture(scope="session")
def model():
  """A width-4 small CNN for 10 classes (tiny and fast to compile)."""
  return get_model("small_cnn", 10, width=4)


@pytest.fixture(scope="session")
def variables(model, rbg_key):
  """Fresh variables of ``model`` for 8×8×1 images."""
  return train.init_variables(model, (8, 8, 1), rbg_key)


@pytest.fixture(scope="session")
def backdoor(digits, rbg_key):
  """A BadNets small CNN on digits (ASR ≥ 0.8), shared by the defense fixture runs: (model,
  normalization, backdoored variables, reserved 10% images/labels, evaluate, before)."""
  ds = digits
  norm = train.Normalization(ds.mean, ds.std)
  model = get_model("small_cnn", ds.num_classes, width=8)
  poison_key, attack_key, reserve_key = jax.random.split(rbg_key, 3)
  poisoned, bd_test = poison_dataset(ds, BadNets(ds.image_shape), ratio=0.1, target=0, key=poison_key)
  attack = AttackTrainConfig(epochs=8, batch_size=64, learning_rate=0.1, cosine_t_max=8, crop_padding=1)
  backdoored, _ = train_backdoored(model, poisoned, norm, attack, attack_key, progress=False)

  def evaluate(variables):
    return metrics.summarize(train.predict(model, variables, ds.x_test, norm), ds.y_test,
                             train.predict(model, variables, bd_test.x, norm), bd_test.y,
                             bd_test.y_orig)

  before = evaluate(backdoored)
  assert before.asr >= 0.8 and before.acc >= 0.85, before
  x_reserved, y_reserved = subset(ds.x_train, ds.y_train, draw_reserved(ds.y_train, 0.1, reserve_key))
  return model, norm, backdoored, x_reserved, y_reserved, evaluate, before


@pytest.fixture(scope="session")
def cli_attack_run(tmp_path_factory):
  """A finished attack run written by the command line (digits, width-4 CNN, one epoch), for
  tests that run `d3jax` processes against it; they must not modify it."""
  from d3jax import cli
  out = tmp_path_factory.mktemp("cli_attack") / "badnets"
  assert cli.main(["attack", "--out", str(out), "--dataset", "digits", "--model-options", "width",
                   "4", "--epochs", "1", "--batch-size", "64", "--eval-every", "0", "--quiet"]) == 0
  return out
