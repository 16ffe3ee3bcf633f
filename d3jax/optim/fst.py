"""Feature Shift Tuning's head regulariser as an optax transformation (Min, Liu, Yang & Wang,
"Towards stable backdoor purification through feature shift tuning", NeurIPS 2023, Eq. (3)).

FST adds α·⟨W, W₀⟩_F (the plain sum of the element-wise product) to the loss, W₀ the head's
backdoored weights, which pushes the re-initialised head away from (anti-aligned with) the
compromised one. The gradient of that term is α·W₀, a constant, so it is added to the incoming
gradient of each selected tensor here; W₀ is recorded from the params given to ``init``. Follow it
with the base optimizer and :func:`d3jax.optim.project_norm` (FST keeps ‖W‖ = ‖W₀‖ after every
step).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from d3jax.optim.selection import Selection, select_mask

PyTree = Any


class FeatureShiftState(NamedTuple):
  """W₀ at the selected leaves (None elsewhere), recorded by ``init``."""
  reference: PyTree


def feature_shift(alpha: Any, select: Selection) -> optax.GradientTransformation:
  """g ↦ g + α·W₀ on the selected tensors (the gradient of α·⟨W, W₀⟩_F); others pass unchanged."""
  def init(params):
    mask = select_mask(params, select)
    return FeatureShiftState(jax.tree.map(lambda p, m: p if m else None, params, mask))

  def update(updates, state, params=None):
    del params

    def one(g, reference):
      return g if reference is None else (g + alpha * reference).astype(g.dtype)

    return jax.tree.map(one, updates, state.reference, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init, update)
