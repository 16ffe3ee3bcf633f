"""Reductions over padded batches, shared by the optimizers, the defenses and the attacks.

Batches have fixed shapes: the last one of an epoch is padded and carries a boolean mask of its
valid rows, so a mean over a batch is a masked mean. This module imports nothing of d3jax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` where ``mask`` is True; masked entries (even NaN or inf) are ignored."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)
