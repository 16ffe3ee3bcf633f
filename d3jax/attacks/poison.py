"""Data poisoning with a pixel-space trigger (spec §1.6, §2.0).

Poisoned images are quantized uint8 before normalization and augmentation, as in the reference.
Everything here takes and returns host numpy arrays; triggers run jitted, in chunks, so memory
stays bounded for large datasets. Draws use ``jax.random`` with the caller's key, so the
poisoned indices differ from BackdoorBench's ``np.random.seed(0)`` draw (spec §2.0).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from d3jax.attacks.triggers import Trigger
from d3jax.data.dataset import Dataset, validate_images, validate_labels

LABEL_MODES = ("all2one", "all2all", "clean_label")
CHUNK = 4096


class PoisonedSet(NamedTuple):
  """Images and labels after poisoning (host numpy arrays).

  Attributes:
    x: uint8 images (N, H, W, C); triggered where ``is_poison``.
    y: int32 labels to train or evaluate on (after the label map).
    is_poison: bool (N,), True where the trigger was applied.
    y_orig: int32 true labels (for RA, spec §1.7).
  """

  x: np.ndarray
  y: np.ndarray
  is_poison: np.ndarray
  y_orig: np.ndarray


def apply_trigger(trigger: Trigger, images: np.ndarray, key: jax.Array | None = None,
                  chunk: int = CHUNK) -> np.ndarray:
  """Applies ``trigger`` to uint8 ``images`` in jitted chunks and returns a numpy array.

  Chunk ``i`` gets ``jax.random.fold_in(key, i)`` (``None`` stays ``None``).
  """
  apply = jax.jit(trigger)
  out = np.empty_like(images)
  for i, start in enumerate(range(0, len(images), chunk)):
    chunk_key = None if key is None else jax.random.fold_in(key, i)
    out[start:start + chunk] = np.asarray(apply(images[start:start + chunk], chunk_key))
  return out


def poison(x: Any, y: Any, trigger: Trigger, *, ratio: float, target: int = 0,
           label_mode: str = "all2one", num_classes: int, key: jax.Array) -> PoisonedSet:
  """Poisons round(ratio·N) training samples drawn with ``key`` (spec §2.0).

  all2one: indices drawn uniformly without replacement over ALL samples (target-class samples
  are not avoided: they get the trigger and keep their label); labels become ``target``.
  all2all: the same draw; labels become (y + 1) mod C. clean_label: the draw is restricted to
  target-class samples and labels are unchanged; ``ratio`` stays relative to the whole set, and
  a target class smaller than the count raises (the reference crashes).

  Args:
    x: uint8 images (N, H, W, C).
    y: integer labels (N,) in [0, num_classes).
    trigger: a pixel-space trigger, e.g. from :func:`d3jax.attacks.get_trigger`.
    ratio: fraction of the whole set to poison, in [0, 1].
    target: target class in [0, num_classes).
    label_mode: "all2one", "all2all" or "clean_label".
    num_classes: number of classes C.
    key: jax PRNG key; the index draw and the trigger get independent sub-keys.

  Returns:
    A :class:`PoisonedSet` with the full (poisoned + clean) training set.
  """
  x, y = _check_inputs(x, y, num_classes, target, label_mode)
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must lie in [0, 1], got {ratio}.")
  count = round(ratio * len(x))
  pool = np.flatnonzero(y == target) if label_mode == "clean_label" else np.arange(len(x))
  if count > len(pool):
    raise ValueError(
        f"clean_label poisoning of {count} samples (ratio {ratio} of {len(x)}) needs that many "
        f"samples of target class {target}, but only {len(pool)} are available; lower ratio to "
        f"at most {len(pool) / len(x):.4g}.")
  draw_key, trigger_key = jax.random.split(key)
  chosen = np.asarray(jax.random.choice(draw_key, len(pool), (count,), replace=False))
  index = np.sort(pool[chosen])
  is_poison = np.zeros(len(x), bool)
  is_poison[index] = True
  x_out = x.copy()
  x_out[index] = apply_trigger(trigger, x[index], trigger_key)
  y_out = y.copy()
  y_out[index] = _map_labels(y[index], target, label_mode, num_classes)
  return PoisonedSet(x_out, y_out, is_poison, y)


def backdoor_test_set(x_test: Any, y_test: Any, trigger: Trigger, *, target: int = 0,
                      label_mode: str = "all2one", num_classes: int,
                      key: jax.Array | None = None) -> PoisonedSet:
  """Builds the backdoor test set used for ASR and RA (spec §1.6).

  all2one and clean_label: every test image whose true label ≠ ``target`` (the target class is
  excluded), triggered, labelled ``target``. all2all: every test image, labelled (y + 1) mod C.
  ``y_orig`` holds the true labels; ``is_poison`` is all True.
  """
  x_test, y_test = _check_inputs(x_test, y_test, num_classes, target, label_mode)
  keep = np.ones(len(y_test), bool) if label_mode == "all2all" else y_test != target
  if not keep.any():
    raise ValueError(
        f"every test sample has the target label {target}, so the backdoor test set is empty.")
  y_orig = y_test[keep]
  return PoisonedSet(
      apply_trigger(trigger, x_test[keep], key),
      _map_labels(y_orig, target, label_mode, num_classes),
      np.ones(len(y_orig), bool), y_orig)


def poison_dataset(dataset: Dataset, trigger: Trigger, *, ratio: float, target: int = 0,
                   label_mode: str = "all2one",
                   key: jax.Array) -> tuple[PoisonedSet, PoisonedSet]:
  """Poisons ``dataset``'s training split and builds its backdoor test set.

  Returns:
    ``(train, bd_test)`` from :func:`poison` and :func:`backdoor_test_set`, with
    ``dataset.num_classes`` and independent sub-keys of ``key``.
  """
  train_key, test_key = jax.random.split(key)
  train = poison(dataset.x_train, dataset.y_train, trigger, ratio=ratio, target=target,
                 label_mode=label_mode, num_classes=dataset.num_classes, key=train_key)
  bd_test = backdoor_test_set(dataset.x_test, dataset.y_test, trigger, target=target,
                              label_mode=label_mode, num_classes=dataset.num_classes,
                              key=test_key)
  return train, bd_test


def _check_inputs(x: Any, y: Any, num_classes: int, target: int,
                  label_mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Validates images, labels, target and label mode; returns numpy (x, int32 y)."""
  if label_mode not in LABEL_MODES:
    raise ValueError(f"Unknown label_mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}.")
  if not isinstance(target, (int, np.integer)) or not 0 <= target < num_classes:
    raise ValueError(f"target must be a class in [0, {num_classes}), got {target}.")
  x = np.asarray(x)
  validate_images(x, "images")
  return x, validate_labels(y, num_classes, len(x), "labels")


def _map_labels(y: np.ndarray, target: int, label_mode: str, num_classes: int) -> np.ndarray:
  """The poisoned-label map of spec §2.0."""
  if label_mode == "all2one":
    return np.full_like(y, target)
  if label_mode == "all2all":
    return ((y + 1) % num_classes).astype(y.dtype)
  return y.copy()
