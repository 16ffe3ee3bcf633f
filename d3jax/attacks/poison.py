"""Data poisoning with pixel-space triggers, and the backdoor test sets that measure it.

Poisoned images are quantized uint8 before normalization and augmentation, as in BackdoorBench.
Everything here takes and returns host numpy arrays; triggers run jitted, in chunks, so memory
stays bounded for large datasets. Draws use ``jax.random`` with the caller's key, so the
poisoned indices differ from BackdoorBench's (a ``np.random.choice`` after ``np.random.seed(0)``).

Label modes: ``all2one`` (poisoned labels become the target), ``all2all`` (y ↦ (y + 1) mod C,
D3 supplement Sec. 8.8), ``clean_label`` (only target-class samples are poisoned, labels kept)
and ``untargeted`` (each poisoned label becomes a uniformly drawn other class; success is any
misclassification, D3 supplement Sec. 8.6, :func:`untargeted_success_rate`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from d3jax.attacks.triggers import LABEL_MODES, Trigger
from d3jax.data.dataset import Dataset, validate_images, validate_labels

CHUNK = 4096


class PoisonedSet(NamedTuple):
  """Images and labels after poisoning (host numpy arrays).

  Attributes:
    x: uint8 images (N, H, W, C); triggered where ``is_poison``.
    y: int32 labels to train or evaluate on (after the label map).
    is_poison: bool (N,), True where the trigger was applied.
    y_orig: int32 true labels (for RA, the label-correction rate).
  """

  x: np.ndarray
  y: np.ndarray
  is_poison: np.ndarray
  y_orig: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Replacement:
  """Pre-generated poisoned copies of a whole image set (BackdoorBench's SSBA resource arrays):
  poisoning sample i takes row i of ``images``. Only :func:`poison` and
  :func:`backdoor_test_set` apply it, as they know the indices.

  Attributes:
    images: uint8 (N, H, W, C), aligned with the set it poisons.
    name: the attack's name.
  """
  images: np.ndarray = dataclasses.field(repr=False)
  name: str = "replacement"
  label_modes: tuple[str, ...] = LABEL_MODES

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    raise ValueError(f"{self.name}: pre-generated images replace samples by index; poison with "
                     "d3jax.attacks.poison or backdoor_test_set, not by calling the trigger.")

  def rows(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of the replacement of ``images``."""
    if self.images.shape != images.shape or self.images.dtype != np.uint8:
      raise ValueError(f"{self.name}: the pre-generated images are {self.images.dtype} "
                       f"{self.images.shape} but the set they replace is uint8 {images.shape}.")
    return self.images[index]


def _triggered(trigger: Trigger, images: np.ndarray, index: np.ndarray,
               key: jax.Array | None) -> np.ndarray:
  """``images[index]`` with the trigger (a :class:`Replacement` by index)."""
  if isinstance(trigger, Replacement):
    return trigger.rows(images, index)
  return apply_trigger(trigger, images[index], key)


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
  """Poisons round(ratio·N) training samples drawn with ``key``.

  all2one, all2all, untargeted: indices drawn uniformly without replacement over ALL samples
  (as in BackdoorBench, target-class samples are not avoided: under all2one they get the trigger
  and keep their label). clean_label: the draw is restricted to target-class samples and labels
  are unchanged; ``ratio`` stays relative to the whole set, and a target class smaller than the
  count raises (BackdoorBench crashes).

  Args:
    x: uint8 images (N, H, W, C).
    y: integer labels (N,) in [0, num_classes).
    trigger: a pixel-space trigger, e.g. from :func:`d3jax.attacks.get_trigger`.
    ratio: fraction of the whole set to poison, in [0, 1].
    target: target class in [0, num_classes).
    label_mode: one of the trigger's ``label_modes``.
    num_classes: number of classes C.
    key: jax PRNG key; the index draw, the labels and the trigger get independent sub-keys.

  Returns:
    A :class:`PoisonedSet` with the full (poisoned + clean) training set.
  """
  poisoned, _ = poison_multi(x, y, [(trigger, target)], ratio=ratio, label_mode=label_mode,
                             num_classes=num_classes, key=key)
  return poisoned


def poison_multi(x: Any, y: Any, attacks: Sequence[tuple[Trigger, int]], *, ratio: float,
                 label_mode: str = "all2one", num_classes: int,
                 key: jax.Array) -> tuple[PoisonedSet, np.ndarray]:
  """Poisons with several (trigger, target) pairs at once (multi-trigger, multi-target; D3
  supplement Table 15): each pair poisons its own round(ratio·N) samples, disjoint from the
  others', as :func:`poison` describes.

  Returns:
    The :class:`PoisonedSet` and ``source`` (N,) int32: the index of the pair that poisoned
    each sample, −1 for clean samples.
  """
  if not attacks:
    raise ValueError("poison_multi needs at least one (trigger, target) pair.")
  for trigger, target in attacks:
    x, y = _check_inputs(x, y, num_classes, target, label_mode, trigger)
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must lie in [0, 1], got {ratio}.")
  count = round(ratio * len(x))
  x_out, y_out = x.copy(), y.copy()
  source = np.full(len(x), -1, np.int32)
  for k, (trigger, target) in enumerate(attacks):
    pair_key = key if k == 0 else jax.random.fold_in(key, k)
    free = source < 0
    pool = np.flatnonzero(free & (y == target) if label_mode == "clean_label" else free)
    if count > len(pool):
      raise ValueError(
          f"{label_mode} poisoning of {count} samples (ratio {ratio} of {len(x)}) for target "
          f"{target} needs that many {'target-class ' if label_mode == 'clean_label' else ''}"
          f"samples not yet poisoned, but only {len(pool)} are available; lower ratio"
          + (" or poison with fewer attacks." if k else f" to at most {len(pool) / len(x):.4g}."))
    draw_key, trigger_key = jax.random.split(pair_key)
    chosen = np.asarray(jax.random.choice(draw_key, len(pool), (count,), replace=False))
    index = np.sort(pool[chosen])
    source[index] = k
    x_out[index] = _triggered(trigger, x, index, trigger_key)
    y_out[index] = _map_labels(y[index], target, label_mode, num_classes,
                               jax.random.fold_in(draw_key, 1))
  return PoisonedSet(x_out, y_out, source >= 0, y), source


def backdoor_test_set(x_test: Any, y_test: Any, trigger: Trigger, *, target: int = 0,
                      label_mode: str = "all2one", num_classes: int,
                      key: jax.Array | None = None) -> PoisonedSet:
  """Builds the backdoor test set used for ASR and RA.

  all2one and clean_label: every test image whose true label ≠ ``target`` (the target class is
  excluded, as in BackdoorBench), triggered, labelled ``target``. all2all: every test image,
  labelled (y + 1) mod C. untargeted: every test image, labelled with its TRUE label (any other
  prediction is a success: measure it with :func:`untargeted_success_rate`, not with ASR).
  ``y_orig`` holds the true labels; ``is_poison`` is all True.
  """
  x_test, y_test = _check_inputs(x_test, y_test, num_classes, target, label_mode, trigger)
  keep = backdoor_test_rows(y_test, target, label_mode)
  if not keep.any():
    raise ValueError(
        f"every test sample has the target label {target}, so the backdoor test set is empty.")
  y_orig = y_test[keep]
  # Clean-label poisoning keeps training labels, but its backdoor still sends inputs to the target.
  test_mode = "all2one" if label_mode == "clean_label" else label_mode
  labels = y_orig if label_mode == "untargeted" else _map_labels(y_orig, target, test_mode, num_classes)
  return PoisonedSet(_triggered(trigger, x_test, np.flatnonzero(keep), key), labels,
                     np.ones(len(y_orig), bool), y_orig)


def backdoor_test_rows(y_test: np.ndarray, target: int, label_mode: str) -> np.ndarray:
  """The test rows a backdoor test set is made from: every row for all2all and untargeted, else
  every row whose true label is not ``target`` (BackdoorBench excludes the target class)."""
  y_test = np.asarray(y_test)
  return (np.ones(len(y_test), bool) if label_mode in ("all2all", "untargeted")
          else y_test != target)


def untargeted_success_rate(clean_predictions: Any, triggered_predictions: Any, y_true: Any) -> float:
  """Untargeted ASR (D3 supplement Sec. 8.6, Table 11): among the samples the model classifies
  correctly without the trigger, the fraction it misclassifies with it.

  Args:
    clean_predictions: class ids (N,) of the model on the clean images.
    triggered_predictions: class ids (N,) on the same images with the trigger.
    y_true: their true labels (N,).
  """
  clean, triggered, y_true = (np.asarray(a) for a in (clean_predictions, triggered_predictions, y_true))
  if not clean.shape == triggered.shape == y_true.shape or clean.ndim != 1:
    raise ValueError(
        "clean_predictions, triggered_predictions and y_true must be class ids of one shape (N,), "
        f"got {clean.shape}, {triggered.shape} and {y_true.shape}.")
  correct = clean == y_true
  if not correct.any():
    raise ValueError("the model classifies no clean sample correctly, so the untargeted ASR is undefined.")
  return float(np.mean(triggered[correct] != y_true[correct]))


def poison_dataset(dataset: Dataset, trigger: Trigger, *, ratio: float, target: int = 0,
                   label_mode: str = "all2one", key: jax.Array,
                   test_trigger: Trigger | None = None) -> tuple[PoisonedSet, PoisonedSet]:
  """Poisons ``dataset``'s training split and builds its backdoor test set (with
  ``test_trigger`` when given, e.g. the test half of pre-generated :class:`Replacement` images).

  Returns:
    ``(train, bd_test)`` from :func:`poison` and :func:`backdoor_test_set`, with
    ``dataset.num_classes`` and independent sub-keys of ``key``.
  """
  train_key, test_key = jax.random.split(key)
  train = poison(dataset.x_train, dataset.y_train, trigger, ratio=ratio, target=target,
                 label_mode=label_mode, num_classes=dataset.num_classes, key=train_key)
  bd_test = backdoor_test_set(dataset.x_test, dataset.y_test, test_trigger or trigger, target=target,
                              label_mode=label_mode, num_classes=dataset.num_classes,
                              key=test_key)
  return train, bd_test


def _check_inputs(x: Any, y: Any, num_classes: int, target: int, label_mode: str,
                  trigger: Trigger) -> tuple[np.ndarray, np.ndarray]:
  """Validates images, labels, target and label mode; returns numpy (x, int32 y)."""
  if label_mode not in LABEL_MODES:
    raise ValueError(f"Unknown label_mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}.")
  if label_mode not in trigger.label_modes:
    raise ValueError(
        f"the {trigger.name} attack is defined for label_mode {', '.join(trigger.label_modes)}, "
        f"not {label_mode!r}.")
  if not isinstance(target, (int, np.integer)) or not 0 <= target < num_classes:
    raise ValueError(f"target must be a class in [0, {num_classes}), got {target}.")
  x = np.asarray(x)
  validate_images(x, "images")
  return x, validate_labels(y, num_classes, len(x), "labels")


def _map_labels(y: np.ndarray, target: int, label_mode: str, num_classes: int,
                key: jax.Array | None = None) -> np.ndarray:
  """The poisoned-label map of ``label_mode`` (``key`` draws the untargeted labels)."""
  if label_mode == "all2one":
    return np.full_like(y, target)
  if label_mode == "all2all":
    return ((y + 1) % num_classes).astype(y.dtype)
  if label_mode == "untargeted":
    shift = np.asarray(jax.random.randint(key, y.shape, 1, num_classes))
    return ((y + shift) % num_classes).astype(y.dtype)
  return y.copy()
