"""Evaluating a model on the clean test set and the backdoor test set (ACC, ASR and RA as in
BackdoorBench's evaluation: eval mode, no augmentation, the whole test sets).

Evaluation is the experimenter's step, after a defense: defenses never call this.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from d3jax.attacks.poison import PoisonedSet
from d3jax.metrics import BackdoorMetrics, summarize
from d3jax.train import Normalization, predict


def evaluate(model: nn.Module, variables: Any, x_test: np.ndarray, y_test: np.ndarray,
             backdoor: PoisonedSet, normalization: Normalization) -> BackdoorMetrics:
  """ACC on the clean test set; ASR and RA on the backdoor test set (eval mode, no augmentation)."""
  clean = predict(model, variables, x_test, normalization)
  triggered = predict(model, variables, backdoor.x, normalization)
  return summarize(clean, y_test, triggered, backdoor.y, backdoor.y_orig)
