"""A frozen copy of the starting weights carried in the optimizer state."""
from __future__ import annotations

from typing import Any

import optax

from d3jax.optim.d3 import ReferenceState


def keep_reference() -> optax.GradientTransformation:
  """Passes updates through unchanged and keeps the params given to ``init`` in its state
  (``ReferenceState.reference``): a reference model for losses that compare the trained model
  with where it started (SAU's frozen backdoored copy). Chain it after the real optimizer."""
  def init(params: Any) -> ReferenceState:
    return ReferenceState(params)

  def update(updates: Any, state: ReferenceState, params: Any = None) -> tuple[Any, ReferenceState]:
    del params
    return updates, state

  return optax.GradientTransformation(init, update)
