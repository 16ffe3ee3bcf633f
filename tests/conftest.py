"""Shared, generic test fixtures (keys and tiny data sets).

Keys use the ``rbg`` PRNG implementation: it compiles much faster than threefry on XLA:CPU,
and the library must accept any typed key anyway.
"""
import jax
import numpy as np
import pytest


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
