"""The D3 optimizer as optax transformations (D3 paper, Eq. (4); supplement, Algorithm 1).

D3 minimises, over all parameters θ with the selected tensors θ_s kept on the sphere
‖θ_s‖ = ‖θ_ref,s‖,

    loss = (λ · mean_i max(0, CE_i − ε) − Σ_l ‖θ_l − θ_ref,l‖) / s,   s = λ + 1 if λ > 1 else 1

(the official code's normalisation of the loss; the paper writes Eq. (4) without s). The clean-loss gradient g comes from the caller
(any model, any loss: see :func:`clean_hinge`); :func:`distance_ascent` turns it into the
gradient of the whole objective, plain SGD with momentum takes the step, and
:func:`project_norm` — a params-aware last link in the manner of
``optax.keep_params_nonnegative`` — rewrites the update so that every selected tensor lands back
on its reference norm (the official code rescales in place after each optimizer step;
momentum buffers untouched).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base

from d3jax.optim.norms import check_norm, norm_gradient, tensor_norm
from d3jax.optim.selection import Selection, param_paths, select_mask
from d3jax.reductions import masked_mean

PyTree = Any
ScalarOrArray = float | jax.Array


def clean_hinge(per_sample_loss: jax.Array, eps: ScalarOrArray, mask: jax.Array | None = None) -> jax.Array:
  """mean_i max(0, ℓ_i − ε): the per-sample hinge of the official code, averaged over valid samples.

  ``mask`` (bool, same shape) excludes padding; samples below ε still count in the mean with 0.
  """
  hinge = jnp.maximum(per_sample_loss - eps, 0.0)
  if mask is None:
    return jnp.mean(hinge)
  return masked_mean(hinge, mask)


def loss_scale(lmd: ScalarOrArray) -> jax.Array:
  """s = λ + 1 when λ > 1, else 1 (the official code's loss scaling) — a ``jnp.where``, so λ may be traced."""
  lmd = jnp.asarray(lmd, jnp.float32)
  return jnp.where(lmd > 1.0, lmd + 1.0, 1.0)


def distance(params: PyTree, reference: PyTree, select: Selection, norm: str = "fro") -> jax.Array:
  """D = Σ over selected tensors of ‖θ − θ_ref‖ (not squared, summed over layers, as in the
  official code; the paper's Eq. (4) writes the same unsquared norm)."""
  check_norm(norm)
  mask = select_mask(reference, select)
  terms = [tensor_norm(p - r, norm)
           for p, r, m in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(mask)) if m]
  return jnp.sum(jnp.stack(terms))


class ReferenceState(NamedTuple):
  """The selected tensors of θ_ref (``None`` at unselected leaves), recorded by ``init``."""
  reference: PyTree


class TargetNormState(NamedTuple):
  """‖θ_ref,l‖ of each selected tensor (``None`` at unselected leaves), recorded by ``init``."""
  targets: PyTree


def _is_none(x: Any) -> bool:
  return x is None


def _selected_reference(reference: PyTree | None, params: PyTree, select: Selection) -> tuple[PyTree, PyTree]:
  """(mask, θ_ref with unselected leaves set to None); θ_ref defaults to ``params``.

  Raises:
    ValueError: a given reference whose tree structure or leaf shapes differ from the params.
  """
  if reference is None:
    reference = params
  elif jax.tree.structure(reference) != jax.tree.structure(params):
    raise ValueError(
        "the D3 reference must have the structure of the params (the same model's parameters): "
        f"got {jax.tree.structure(reference)}, expected {jax.tree.structure(params)}.")
  else:
    for path, (r, p) in zip(param_paths(params), zip(jax.tree.leaves(reference), jax.tree.leaves(params))):
      if jnp.shape(r) != jnp.shape(p):
        raise ValueError(f"the D3 reference's {path} has shape {jnp.shape(r)}, but the params' has "
                         f"{jnp.shape(p)}; pass the weights of the same model.")
  mask = select_mask(params, select)
  return mask, jax.tree.map(lambda r, m: r if m else None, reference, mask)


def _check_params(params: PyTree | None) -> None:
  if params is None:
    raise ValueError(base.NO_PARAMS_MSG)


def distance_ascent(reference: PyTree | None, select: Selection, lmd: ScalarOrArray = 10.0,
                    norm: str = "fro") -> base.GradientTransformation:
  """Maps the clean-loss gradient g to the gradient of the D3 objective.

  For selected tensors: (λ·g − ∂‖θ − θ_ref‖/∂θ) / s; for all others: λ·g / s (every parameter
  receives the clean gradient, only the selected ones the distance gradient, as in the official
  code). θ_ref is ``reference``, or the params given to ``init`` when ``reference`` is None; it is
  kept in the transformation's state (:class:`ReferenceState`), so a state can be vmapped over
  runs with different references. Needs ``params`` in ``update``.
  """
  check_norm(norm)
  if reference is not None:
    select_mask(reference, select)  # a selection that cannot work fails here, not at init

  def init_fn(params):
    _, selected = _selected_reference(reference, params, select)
    return ReferenceState(selected)

  def update_fn(updates, state, params=None):
    _check_params(params)
    scale = jnp.asarray(lmd, jnp.float32) / loss_scale(lmd)
    inv_s = 1.0 / loss_scale(lmd)

    def one(g, p, r):
      if r is None:
        return (scale * g).astype(g.dtype)
      return (scale * g - inv_s * norm_gradient(p - r, norm)).astype(g.dtype)

    return jax.tree.map(one, updates, params, state.reference, is_leaf=_is_none), state

  return base.GradientTransformation(init_fn, update_fn)


def project_norm(reference: PyTree | None, select: Selection, norm: str = "fro") -> base.GradientTransformation:
  """Rewrites the update so that each selected tensor ends on its reference norm.

  With θ' = θ + u, the returned update is θ'·‖θ_ref‖/‖θ'‖ − θ (the official code rescales the
  selected weights in place after every optimizer step; momentum buffers are untouched). A tensor
  that would land exactly on zero is left unscaled (no direction to rescale). The target norms come
  from ``reference``, or from the params given to ``init`` when it is None, and live in the state
  (:class:`TargetNormState`). Use it as the last link of a chain; needs ``params`` in ``update``.
  """
  check_norm(norm)
  if reference is not None:
    select_mask(reference, select)

  def init_fn(params):
    _, selected = _selected_reference(reference, params, select)
    return TargetNormState(jax.tree.map(lambda r: None if r is None else tensor_norm(r, norm),
                                        selected, is_leaf=_is_none))

  def update_fn(updates, state, params=None):
    _check_params(params)

    def one(u, p, target):
      if target is None:
        return u
      moved = p + u
      length = tensor_norm(moved, norm)
      factor = jnp.where(length > 0, target / jnp.where(length > 0, length, 1.0), 1.0)
      return (moved * factor - p).astype(u.dtype)

    return jax.tree.map(one, updates, params, state.targets, is_leaf=_is_none), state

  return base.GradientTransformation(init_fn, update_fn)


def d3(reference: PyTree | None, select: Selection, learning_rate: optax.ScalarOrSchedule,
       momentum: ScalarOrArray = 0.9, lmd: ScalarOrArray = 10.0, norm: str = "fro"
       ) -> base.GradientTransformation:
  """The D3 optimizer: distance ascent → SGD with momentum → projection onto ‖θ_s‖ = ‖θ_ref,s‖.

  Args:
    reference: the possibly backdoored parameters θ_init (same structure as the params), or None:
      then the params passed to ``init`` are the reference. Either way it is kept in the
      optimizer state, so one jitted step serves every run.
    select: regex over '/'-joined paths (e.g. ``"linear/kernel"``) or a boolean pytree.
    learning_rate: a float, an array (for vmapped sweeps) or an optax schedule.
    momentum: SGD momentum (0.9 in the official code; no dampening, no Nesterov). May be traced.
    lmd: λ, the weight of the clean-loss hinge (paper 10; official config 0.5). May be traced.
    norm: "fro" (paper), "l1" or "nuclear".

  Feed it the gradient of :func:`clean_hinge` and pass ``params`` to ``update``.
  """
  return optax.chain(
      distance_ascent(reference, select, lmd, norm),
      optax.sgd(learning_rate, momentum=momentum),
      project_norm(reference, select, norm),
  )
