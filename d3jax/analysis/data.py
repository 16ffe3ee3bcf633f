"""The evaluation data of an analysis: clean test images paired with their triggered copies.

For evaluation only (it holds the trigger's output and the target labels); no defense uses it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from d3jax.workflows.pipeline import Backdoored


class Paired(NamedTuple):
  """Test images that the backdoor test set triggers, the same images triggered, their true labels
  and the labels the attack wants (the target, for all-to-one)."""
  clean: np.ndarray
  poisoned: np.ndarray
  label: np.ndarray
  target: np.ndarray


def paired(backdoored: Backdoored) -> Paired:
  """The clean test images behind the backdoor test set, aligned with it (the set keeps the test
  order and drops the target class unless the attack is all-to-all)."""
  run, dataset, bd = backdoored.run, backdoored.dataset, backdoored.backdoor_test
  keep = (np.ones(len(dataset.y_test), bool) if run.mode in ("all2all", "untargeted")
          else dataset.y_test != run.target)
  clean = dataset.x_test[keep]
  if clean.shape != bd.x.shape or not np.array_equal(dataset.y_test[keep], bd.y_orig):
    raise ValueError("the backdoor test set is not aligned with the clean test set; rebuild the run.")
  return Paired(clean, bd.x, bd.y_orig, bd.y)


def subsample(count: int, n: int, seed: int = 0) -> np.ndarray:
  """``min(count, n)`` sorted indices drawn without replacement from range(n)."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=min(count, n), replace=False))
