"""The two-pass sharpness-aware step on the training engine, shared by the adaptive SAM attack
and the FT-SAM defense.

A recipe whose optimizer is :func:`d3jax.optim.sam.adaptive_sam` around its base optimizer runs
in a :class:`SAMProgram`: each step calls the engine's step twice on the same batch (same
augmentation and dropout), first the ascent to w + e, then the descent from w with the gradient
taken at w + e.
"""
from __future__ import annotations

import dataclasses

import jax

from d3jax.engine.train import Batch, Program, TrainState


@dataclasses.dataclass(frozen=True, eq=False)
class SAMProgram(Program):
  """A :class:`d3jax.engine.train.Program` whose step is one (A)SAM step. As in BackdoorBench's SAM
  (``utils/defense_utils/sam``, which sets the BN momentum to 0 for the second pass), the second
  pass does not update the BN running statistics; the reported loss is the one at w."""

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    ascended, metrics = super().step(state, batch)
    descended, _ = super().step(ascended.replace(step=state.step), batch)
    return descended.replace(batch_stats=ascended.batch_stats), metrics
