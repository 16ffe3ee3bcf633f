"""Shared, generic test fixtures (keys and tiny data sets).

Keys use the ``rbg`` PRNG implementation: it compiles much faster than threefry on XLA:CPU,
and the library must accept any typed key anyway.
"""
import jax
import numpy as np
import pytest

from d3jax import train
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
