"""Adaptive sharpness-aware minimisation (ASAM) as an optax transformation.

Kwon, Kim, Park & Choi, "ASAM: adaptive sharpness-aware minimization for scale-invariant learning
of deep neural networks", ICML 2021, Eq. (8)–(9) with T_w = |w| (η = 0), as BackdoorBench's
``utils/defense_utils/sam`` implements it: the ascent step is

    e = ρ · w² ⊙ g / (‖ |w| ⊙ g ‖₂ + 1e-12)        (global norm over every parameter)

and the descent step applies the base optimizer to the gradient g' taken at w + e, from w.

Like ``optax.contrib.sam`` without its opaque mode, the transformation alternates: the first of
every two updates moves the params to w + e (the ascent), the second returns them to w and takes
the base optimizer's step with the gradient it is given (now taken at w + e). The caller computes
the two gradients on the same batch; :class:`d3jax.engine.sharpness.SAMProgram` does that on the
training engine (the adaptive attack of the D3 paper's Table 5, and FT-SAM). ``rho`` may be a
traced array (a swept hyperparameter).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

PyTree = Any


class AdaptiveSAMState(NamedTuple):
  """``descend``: the next update is the descent; ``perturbation``: the pending e; ``inner``: the
  base optimizer's state (advanced on descents only)."""
  descend: jax.Array
  perturbation: PyTree
  inner: optax.OptState


def adaptive_sam(base: optax.GradientTransformation, rho: Any,
                 eps: float = 1e-12) -> optax.GradientTransformation:
  """ASAM around ``base`` with radius ``rho``; needs ``params`` in ``update``.

  Args:
    base: the optimizer taking the descent step, e.g. SGD with weight decay (its weight decay sees
      the restored params w).
    rho: the neighbourhood radius ρ.
    eps: added to the norm in the ascent step.
  """
  def init(params):
    return AdaptiveSAMState(jnp.zeros((), bool), jax.tree.map(jnp.zeros_like, params), base.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    scaled_norm = optax.tree.norm(jax.tree.map(lambda w, g: jnp.abs(w) * g, params, grads))
    ascent = jax.tree.map(lambda w, g: rho * w * w * g / (scaled_norm + eps), params, grads)
    restored = jax.tree.map(jnp.subtract, params, state.perturbation)
    steps, inner = base.update(grads, state.inner, restored)
    descent = jax.tree.map(jnp.subtract, steps, state.perturbation)

    def pick(on_descent, on_ascent):
      return jax.tree.map(lambda a, b: jnp.where(state.descend, a, b), on_descent, on_ascent)

    updates = pick(descent, ascent)
    new_state = AdaptiveSAMState(jnp.logical_not(state.descend),
                                 pick(jax.tree.map(jnp.zeros_like, ascent), ascent),
                                 pick(inner, state.inner))
    return updates, new_state

  return optax.GradientTransformation(init, update)
