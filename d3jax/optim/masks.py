"""Training multiplicative neuron masks on selected tensors, folded into them, as an optax
transformation (NFT: Karim et al., "Augmented neural fine-tuning for efficient backdoor
purification", ECCV 2024, Eq. (4)–(6)).

Each selected tensor γ (e.g. a BN scale) is trained only through a mask m of its shape, with
γ = γ₀ ⊙ m, γ₀ its value at ``init``, m starting at 1. The incoming gradient is ∂L/∂γ; by the chain
rule ∂L/∂m = γ₀ ⊙ ∂L/∂γ. The base optimizer steps m, which is then clamped to [μ(l), 1] with
μ(l) = α·exp(−β·l), l = 1, 2, … the index of the selected tensor in the params' flattening order
(for Flax models: alphabetical paths, e.g. ``layer1_0/bn1`` < ``layer1_0/bn2`` < ``layer1_1/bn1``),
and the update moves γ to γ₀ ⊙ m. Every tensor that is not selected receives a zero update, so only
the masks train, and the trained params already carry the masks: they load in the plain model.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from d3jax.optim.selection import Selection, select_mask

PyTree = Any


class MaskState(NamedTuple):
  """γ₀ and m at the selected leaves (None elsewhere), and the base optimizer's state over m."""
  reference: PyTree
  masks: PyTree
  inner: optax.OptState


def _is_none(x: Any) -> bool:
  return x is None


def lower_bounds(count: int, alpha: Any, beta: Any) -> jax.Array:
  """μ(l) = α·exp(−β·l) for l = 1 … ``count``."""
  return alpha * jnp.exp(-beta * jnp.arange(1, count + 1, dtype=jnp.float32))


def neuron_masks(base: optax.GradientTransformation, select: Selection, alpha: Any = 0.8,
                 beta: Any = 0.5) -> optax.GradientTransformation:
  """Trains masks m on the ``select``-ed tensors with ``base``, clamped to [α·e^(−β·l), 1]; needs
  ``params`` in ``update``. ``alpha`` and ``beta`` may be traced arrays."""
  def init(params):
    mask = select_mask(params, select)
    reference = jax.tree.map(lambda p, m: p if m else None, params, mask)
    masks = jax.tree.map(lambda r: None if r is None else jnp.ones_like(r), reference, is_leaf=_is_none)
    return MaskState(reference, masks, base.init(masks))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    mask_grads = jax.tree.map(lambda r, g: None if r is None else r * g, state.reference, grads,
                              is_leaf=_is_none)
    steps, inner = base.update(mask_grads, state.inner, state.masks)
    moved = optax.apply_updates(state.masks, steps)
    leaves, treedef = jax.tree.flatten(moved)
    bounds = lower_bounds(len(leaves), alpha, beta)
    masks = jax.tree.unflatten(treedef, [jnp.clip(m, bounds[i], 1.0) for i, m in enumerate(leaves)])

    def one(p, r, m):
      return jnp.zeros_like(p) if r is None else (r * m - p).astype(p.dtype)

    updates = jax.tree.map(one, params, state.reference, masks, is_leaf=_is_none)
    return updates, MaskState(state.reference, masks, inner)

  return optax.GradientTransformation(init, update)


def mask_penalty(params: PyTree, state: MaskState) -> jax.Array:
  """Σ_l ‖1 − m_l‖₁ with m = γ/γ₀ read from the params (0 where γ₀ = 0, whose γ stays 0), so that
  its gradient through the chain rule above is −sign(1 − m)."""
  def one(p, r):
    ratio = p / jnp.where(r == 0, 1.0, r)
    return jnp.sum(jnp.where(r == 0, 0.0, jnp.abs(1.0 - ratio)))

  terms = jax.tree.map(lambda r, p: None if r is None else one(p, r), state.reference, params,
                       is_leaf=_is_none)
  return sum(jax.tree.leaves(terms), jnp.float32(0))
