"""Seeded index draws: train/test splits, the defender's reserved set, its held-out part.

DESIGN.md (Data, "Reserved set"; Principles: "every random draw comes from an explicit
``jax.random`` key"). All functions run on the host and return numpy int64 index
arrays sorted ascending, ready for fancy indexing of the dataset arrays.

Deliberate deviation from BackdoorBench: its reserved set is
``random.sample(range(N), int(N * ratio))`` with CPython's ``random`` after ``random.seed(0)``
(and ``np.random.choice`` per class for FT-SAM). Here every draw comes from a ``jax.random`` key
(threefry, identical on every platform), so the SIZES match BackdoorBench but the INDICES do not.
Index order is irrelevant downstream because every loader shuffles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype "
                     f"{labels.dtype}.")
  if labels.size == 0:
    raise ValueError("labels is empty; there is nothing to draw from.")
  if labels.min() < 0:
    raise ValueError(f"labels must be non-negative class indices, found {labels.min()}.")
  return labels


def _shuffle_within_classes(labels: np.ndarray, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Returns (order, counts): indices grouped by class (ascending), random order inside a class."""
  noise = np.asarray(jax.random.bits(key, labels.shape, dtype=jnp.uint32))
  return np.lexsort((noise, labels)), np.bincount(labels)


def _take_per_class(labels: np.ndarray, key: jax.Array, per_class: np.ndarray) -> np.ndarray:
  """The first ``per_class[c]`` indices of each class's shuffled block, concatenated and sorted."""
  order, counts = _shuffle_within_classes(labels, key)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  chosen = [order[s:s + k] for s, k in zip(starts, per_class)]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(labels: np.ndarray, train_fraction: float,
                     key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices class by class: ``floor(n_c * train_fraction)`` of class c go to train.

  Used to cut the embedded datasets (digits, mnist5k) into class-balanced train/test parts.

  Args:
    labels: (N,) integer class labels.
    train_fraction: fraction of each class that goes to the first part, in (0, 1).
    key: a ``jax.random`` key.

  Returns:
    (train_idx, test_idx), disjoint, sorted, covering ``range(N)``.
  """
  labels = _check_labels(labels)
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}.")
  counts = np.bincount(labels)
  per_class = np.floor(counts * train_fraction + 1e-9).astype(np.int64)
  train_idx = _take_per_class(labels, key, per_class)
  test_idx = np.setdiff1d(np.arange(len(labels)), train_idx).astype(np.int64)
  return train_idx, test_idx


def draw_reserved(labels: np.ndarray, ratio: float, key: jax.Array,
                  class_balanced: bool = False) -> np.ndarray:
  """Draws the defender's reserved clean subset of the training set (5% in the D3 paper, §4.1).

  Args:
    labels: (N,) integer labels of the clean training set.
    ratio: fraction of the training set to reserve, in (0, 1]; BackdoorBench uses 0.05.
    key: a ``jax.random`` key (see the module docstring for the deviation this implies).
    class_balanced: False draws ``int(N * ratio)`` indices uniformly without replacement
      (``choose_index``); True draws ``int(N * ratio / C)`` per class, C = max label + 1
      (FT-SAM's ``choose_by_class``).

  Returns:
    Sorted int64 indices into the training set, without duplicates.

  Raises:
    ValueError: ratio outside (0, 1], a draw of zero samples, or a class with fewer samples
      than the per-class count.
  """
  labels = _check_labels(labels)
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
  n = len(labels)
  if not class_balanced:
    k = int(n * ratio)
    if k == 0:
      raise ValueError(f"ratio {ratio} of {n} samples draws 0 samples; raise the ratio.")
    return np.sort(np.asarray(jax.random.permutation(key, n))[:k]).astype(np.int64)
  counts = np.bincount(labels)
  k = int(n * ratio / len(counts))
  if k == 0:
    raise ValueError(f"ratio {ratio} of {n} samples over {len(counts)} classes draws 0 samples "
                     "per class; raise the ratio.")
  short = np.flatnonzero(counts < k)
  if short.size:
    raise ValueError(f"class-balanced draw needs {k} samples per class but class(es) "
                     f"{short.tolist()} have only {counts[short].tolist()}; lower the ratio or "
                     "use class_balanced=False.")
  return _take_per_class(labels, key, np.full(len(counts), k))


def split_holdout(indices: np.ndarray, fraction: float,
                  key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """Holds out ``int(len(indices) * fraction)`` of ``indices`` for model selection.

  DESIGN.md (Principles, threat model): a defense that must pick a checkpoint or a threshold
  uses a held-out part of the reserved set, never the test set.

  Returns:
    (train_idx, holdout_idx): both sorted, disjoint, each non-empty.
  """
  indices = np.asarray(indices)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} and dtype "
                     f"{indices.dtype}.")
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
  k = int(len(indices) * fraction)
  if not 0 < k < len(indices):
    raise ValueError(f"holding out {fraction} of {len(indices)} indices leaves an empty part "
                     f"({k} held out); change the fraction or reserve more data.")
  perm = np.asarray(jax.random.permutation(key, len(indices)))
  return (np.sort(indices[perm[k:]]).astype(np.int64),
          np.sort(indices[perm[:k]]).astype(np.int64))


def subset(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(x[indices], y[indices])``, e.g. the reserved set from the clean training set."""
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} samples but y has {len(y)}.")
  return x[indices], y[indices]
