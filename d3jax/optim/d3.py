"""The D3 optimizer as optax transformations (D3 paper Eq. (4); spec §5.5–§5.7).

D3 minimises, over all parameters θ with the selected tensors θ_s kept on the sphere
‖θ_s‖ = ‖θ_ref,s‖,

    loss = (λ · mean_i max(0, CE_i − ε) − Σ_l ‖θ_l − θ_ref,l‖) / s,   s = λ + 1 if λ > 1 else 1

(the official code's normalisation, spec §5.5). The clean-loss gradient g comes from the caller
(any model, any loss: see :func:`clean_hinge`); :func:`distance_ascent` turns it into the
gradient of the whole objective, plain SGD with momentum takes the step, and
:func:`project_norm` — a params-aware last link in the manner of
``optax.keep_params_nonnegative`` — rewrites the update so that every selected tensor lands back
on its reference norm (spec §5.7 step 4; momentum buffers untouched).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax._src import base

from d3jax.optim.norms import check_norm, norm_gradient, tensor_norm
from d3jax.optim.selection import Selection, select_mask

PyTree = Any
ScalarOrArray = float | jax.Array


def clean_hinge(per_sample_loss: jax.Array, eps: ScalarOrArray, mask: jax.Array | None = None) -> jax.Array:
  """mean_i max(0, ℓ_i − ε): the per-sample hinge of spec §5.5, averaged over valid samples.

  ``mask`` (bool, same shape) excludes padding; samples below ε still count in the mean with 0.
  """
  hinge = jnp.maximum(per_sample_loss - eps, 0.0)
  if mask is None:
    return jnp.mean(hinge)
  return masked_mean(hinge, mask)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` where ``mask`` is True; masked entries (even NaN or inf) are ignored."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)


def loss_scale(lmd: ScalarOrArray) -> jax.Array:
  """s = λ + 1 when λ > 1, else 1 (spec §5.5) — a ``jnp.where``, so λ may be traced."""
  lmd = jnp.asarray(lmd, jnp.float32)
  return jnp.where(lmd > 1.0, lmd + 1.0, 1.0)


def distance(params: PyTree, reference: PyTree, select: Selection, norm: str = "fro") -> jax.Array:
  """D = Σ over selected tensors of ‖θ − θ_ref‖ (not squared, summed over layers; spec §5.5)."""
  check_norm(norm)
  mask = select_mask(reference, select)
  terms = [tensor_norm(p - r, norm)
           for p, r, m in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(mask)) if m]
  return jnp.sum(jnp.stack(terms))


def params_aware(rewrite: Callable[[PyTree, PyTree], PyTree]) -> base.GradientTransformation:
  """A stateless transformation whose ``update`` rewrites the updates using the params.

  The pattern of ``optax.keep_params_nonnegative``: called without params it raises optax's
  no-params error.
  """
  def init_fn(params):
    del params
    return base.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    return rewrite(updates, params), state

  return base.GradientTransformation(init_fn, update_fn)


def distance_ascent(reference: PyTree, select: Selection, lmd: ScalarOrArray = 10.0,
                    norm: str = "fro") -> base.GradientTransformation:
  """Maps the clean-loss gradient g to the gradient of the D3 objective.

  For selected tensors: (λ·g − ∂‖θ − θ_ref‖/∂θ) / s; for all others: λ·g / s (spec §5.5–§5.6:
  every parameter receives the clean gradient, only the selected ones the distance gradient).
  Needs ``params`` in ``update``.
  """
  check_norm(norm)
  mask = select_mask(reference, select)

  def rewrite(updates, params):
    scale = jnp.asarray(lmd, jnp.float32) / loss_scale(lmd)
    inv_s = 1.0 / loss_scale(lmd)

    def one(g, p, r, selected):
      if not selected:
        return (scale * g).astype(g.dtype)
      return (scale * g - inv_s * norm_gradient(p - r, norm)).astype(g.dtype)

    return jax.tree.map(one, updates, params, reference, mask)

  return params_aware(rewrite)


def project_norm(reference: PyTree, select: Selection, norm: str = "fro") -> base.GradientTransformation:
  """Rewrites the update so that each selected tensor ends on its reference norm.

  With θ' = θ + u, the returned update is θ'·‖θ_ref‖/‖θ'‖ − θ (spec §5.7 step 4). A tensor that
  would land exactly on zero is left unscaled (no direction to rescale). Use it as the last link
  of a chain; needs ``params`` in ``update``.
  """
  check_norm(norm)
  mask = select_mask(reference, select)
  targets = jax.tree.map(lambda r, m: tensor_norm(r, norm) if m else None, reference, mask)

  def rewrite(updates, params):
    def one(u, p, target, selected):
      if not selected:
        return u
      moved = p + u
      length = tensor_norm(moved, norm)
      factor = jnp.where(length > 0, target / jnp.where(length > 0, length, 1.0), 1.0)
      return (moved * factor - p).astype(u.dtype)

    return jax.tree.map(one, updates, params, targets, mask, is_leaf=lambda x: x is None)

  return params_aware(rewrite)


def d3(reference: PyTree, select: Selection, learning_rate: optax.ScalarOrSchedule,
       momentum: float = 0.9, lmd: ScalarOrArray = 10.0, norm: str = "fro") -> base.GradientTransformation:
  """The D3 optimizer: distance ascent → SGD with momentum → projection onto ‖θ_s‖ = ‖θ_ref,s‖.

  Args:
    reference: the possibly backdoored parameters θ_init (same structure as the params).
    select: regex over '/'-joined paths (e.g. ``"linear/kernel"``) or a boolean pytree.
    learning_rate: a float, an array (for vmapped sweeps) or an optax schedule.
    momentum: SGD momentum (0.9 in the official code; no dampening, no Nesterov).
    lmd: λ, the weight of the clean-loss hinge (paper 10; official config 0.5). May be traced.
    norm: "fro" (paper), "l1" or "nuclear".

  Feed it the gradient of :func:`clean_hinge` and pass ``params`` to ``update``.
  """
  return optax.chain(
      distance_ascent(reference, select, lmd, norm),
      optax.sgd(learning_rate, momentum=momentum),
      project_norm(reference, select, norm),
  )
