"""Backdoor metrics computed from predictions: ACC, ASR, RA, DER and RIR (the D3 paper,
§4.1 "Metrics", and Eq. (5) for DER).

Model evaluation lives elsewhere; these functions only compare predicted class ids with labels.
Predictions may be integer class ids of shape (N,) or logits/scores of shape (N, C), which are
reduced with argmax. Inputs may be numpy or jax arrays; results are python floats in [0, 1]
(fractions, not percentages; multiply by 100 for a table).
"""
from __future__ import annotations

import types
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[np.ndarray, jax.Array, float]


class BackdoorMetrics(NamedTuple):
  """Fractions in [0, 1] for one model.

  Attributes:
    acc: clean accuracy on the full clean test set.
    asr: attack success rate, fraction of the backdoor test set predicted as the poisoned label.
    ra: robust accuracy (label-correction rate), fraction of the backdoor test set predicted as
      the sample's original label.
  """

  acc: float
  asr: float
  ra: float


def _class_ids(predictions: ArrayLike, what: str) -> np.ndarray:
  """Returns (N,) class ids from int ids (N,) or from logits (N, C) by argmax."""
  predictions = np.asarray(predictions)
  if predictions.ndim == 2:
    return predictions.argmax(axis=-1)
  if predictions.ndim == 1 and np.issubdtype(predictions.dtype, np.integer):
    return predictions
  raise ValueError(
      f"{what} must be integer class ids of shape (N,) or logits of shape (N, C), got dtype "
      f"{predictions.dtype} and shape {predictions.shape}.")


def _match_rate(predictions: ArrayLike, labels: ArrayLike, what: str) -> float:
  """Fraction of samples whose predicted class equals ``labels``."""
  predicted = _class_ids(predictions, f"{what} predictions")
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{what} labels must be integer class ids of shape (N,), got dtype {labels.dtype} and "
        f"shape {labels.shape}.")
  if len(predicted) != len(labels):
    raise ValueError(
        f"{what}: {len(predicted)} predictions but {len(labels)} labels; pass one prediction "
        "per labelled sample.")
  if len(labels) == 0:
    raise ValueError(f"{what}: no samples; the metric is undefined on an empty set.")
  return float(np.mean(predicted == labels))


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
  """Top-1 accuracy (ACC): fraction of ``predictions`` equal to ``labels``.

  Args:
    predictions: int class ids (N,), or logits (N, C) which are reduced by argmax.
    labels: int true labels (N,).
  """
  return _match_rate(predictions, labels, "accuracy")


def attack_success_rate(bd_predictions: ArrayLike, bd_labels: ArrayLike) -> float:
  """ASR: fraction of the backdoor test set predicted as its poisoned label.

  Args:
    bd_predictions: class ids (N,) or logits (N, C) of the model on the triggered test images.
    bd_labels: the poisoned labels (the target class for all-to-one attacks), shape (N,).
  """
  return _match_rate(bd_predictions, bd_labels, "attack_success_rate")


def robust_accuracy(bd_predictions: ArrayLike, original_labels: ArrayLike) -> float:
  """RA, the label-correction rate: triggered images predicted as their true label.

  Args:
    bd_predictions: class ids (N,) or logits (N, C) of the model on the triggered test images.
    original_labels: the true labels of those images before poisoning, shape (N,).
  """
  return _match_rate(bd_predictions, original_labels, "robust_accuracy")


def summarize(clean_pred: ArrayLike, clean_labels: ArrayLike, bd_pred: ArrayLike,
              bd_labels: ArrayLike, bd_orig_labels: ArrayLike) -> BackdoorMetrics:
  """ACC on the clean test set, ASR and RA on the backdoor test set, from predictions.

  ``bd_labels`` are the poisoned labels and ``bd_orig_labels`` the true labels of the same
  triggered images, both aligned with ``bd_pred``.
  """
  return BackdoorMetrics(
      acc=accuracy(clean_pred, clean_labels),
      asr=attack_success_rate(bd_pred, bd_labels),
      ra=robust_accuracy(bd_pred, bd_orig_labels))


def _fractions(fn: str, **values: ArrayLike) -> tuple[types.ModuleType, dict]:
  """Returns the array namespace to use and the inputs, range-checked when concrete."""
  if any(isinstance(v, jax.core.Tracer) for v in values.values()):
    return jnp, values
  values = {k: np.asarray(v, np.float64) for k, v in values.items()}
  for key, value in values.items():
    if not np.all((value >= 0) & (value <= 1)):
      raise ValueError(
          f"{fn} expects fractions in [0, 1], got {key}={value}; pass fractions, e.g. divide "
          "percentages such as 91.32 by 100.")
  return np, values


def _rate(xp: types.ModuleType, improvement: ArrayLike,
          acc_drop: ArrayLike) -> Union[float, np.ndarray, jax.Array]:
  """(max(0, improvement) − max(0, ACC drop) + 1) / 2, shared by DER and RIR."""
  rate = (xp.maximum(0.0, improvement) - xp.maximum(0.0, acc_drop) + 1.0) / 2.0
  return float(rate) if xp is np and rate.ndim == 0 else rate


def der(acc_before: ArrayLike, asr_before: ArrayLike, acc_after: ArrayLike,
        asr_after: ArrayLike) -> Union[float, np.ndarray, jax.Array]:
  """Defense Effectiveness Rating, Eq. (5) of the D3 paper.

  DER = (max(0, ASR_before − ASR_after) − max(0, ACC_before − ACC_after) + 1) / 2, a fraction in
  [0, 1]: 0.5 means no change; an ASR increase is clipped to no credit and an ACC gain earns
  nothing. "Before" is the backdoored model, "after" the defended one.

  All four arguments are fractions in [0, 1] (percentages raise ValueError). They broadcast
  elementwise, so a sweep can pass arrays: python floats / 0-d inputs give a python float,
  concrete arrays a float64 numpy array. Under ``jax.jit``/``vmap`` (traced inputs) the result is
  a jax array and the range check is skipped, since traced values cannot be inspected.
  """
  xp, v = _fractions("der", acc_before=acc_before, asr_before=asr_before, acc_after=acc_after,
                     asr_after=asr_after)
  return _rate(xp, v["asr_before"] - v["asr_after"], v["acc_before"] - v["acc_after"])


def rir(acc_before: ArrayLike, ra_before: ArrayLike, acc_after: ArrayLike,
        ra_after: ArrayLike) -> Union[float, np.ndarray, jax.Array]:
  """Robust Improvement Rate, DER's counterpart for label correction.

  RIR = (max(0, RA_after − RA_before) − max(0, ACC_before − ACC_after) + 1) / 2. Same input
  conventions and return types as :func:`der`.
  """
  xp, v = _fractions("rir", acc_before=acc_before, ra_before=ra_before, acc_after=acc_after,
                     ra_after=ra_after)
  return _rate(xp, v["ra_after"] - v["ra_before"], v["acc_before"] - v["acc_after"])
