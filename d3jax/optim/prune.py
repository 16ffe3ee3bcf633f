"""Keeping pruned weights pruned while fine-tuning, as an optax transformation (Fine-Pruning:
Liu, Dolan-Gavitt & Garg, RAID 2018, §4: pruning, then fine-tuning the pruned network)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from d3jax.optim.selection import Selection, select_mask

PyTree = Any


class PrunedState(NamedTuple):
  """Which entries of each selected tensor were exactly zero at ``init`` (None elsewhere)."""
  pruned: PyTree


def keep_pruned(select: Selection) -> optax.GradientTransformation:
  """The last link of a chain: entries of the ``select``-ed tensors that are exactly zero at
  ``init`` (the pruned ones) stay zero, whatever the update before it (momentum, weight decay)."""
  def init(params):
    mask = select_mask(params, select)
    return PrunedState(jax.tree.map(lambda p, m: (p == 0) if m else None, params, mask))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)

    def one(u, p, pruned):
      return u if pruned is None else jnp.where(pruned, -p, u).astype(u.dtype)

    return jax.tree.map(one, updates, params, state.pruned, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(init, update)
