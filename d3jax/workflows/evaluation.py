"""Evaluating a model on the clean test set and the backdoor test set (ACC, ASR and RA as in
BackdoorBench's evaluation: eval mode, no augmentation, the whole test sets).

Evaluation is the experimenter's step, after a defense: defenses never call this.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from d3jax.attacks.poison import PoisonedSet, untargeted_success_rate
from d3jax.metrics import BackdoorMetrics, summarize
from d3jax.engine.train import Normalization, predict


def evaluate(model: nn.Module, variables: Any, x_test: np.ndarray, y_test: np.ndarray,
             backdoor: PoisonedSet, normalization: Normalization, *,
             untargeted: bool = False) -> BackdoorMetrics:
  """ACC on the clean test set; ASR and RA on the backdoor test set (eval mode, no augmentation).

  ``untargeted``: the backdoor set is the whole test set triggered, in order (as
  :func:`d3jax.attacks.backdoor_test_set` builds it for that mode), and ASR is
  :func:`d3jax.attacks.untargeted_success_rate`: among the test samples classified correctly
  without the trigger, the share misclassified with it (D3 supplement Sec. 8.6, Table 11).
  """
  clean = predict(model, variables, x_test, normalization)
  triggered = predict(model, variables, backdoor.x, normalization)
  measured = summarize(clean, y_test, triggered, backdoor.y, backdoor.y_orig)
  if not untargeted:
    return measured
  if len(backdoor.y_orig) != len(y_test) or not np.array_equal(backdoor.y_orig, y_test):
    raise ValueError("an untargeted backdoor test set must be the whole test set in order, got "
                     f"{len(backdoor.y_orig)} samples for a test set of {len(y_test)}.")
  return measured._replace(asr=untargeted_success_rate(clean, triggered, y_test))
