"""Implicit hypergradients by fixed-point iteration (i-BAU: Zeng, Chen, Park, Mao, Jin & Jia,
"Adversarial unlearning of backdoors via implicit hypergradient", ICLR 2022, Algorithm 1 and
Eq. (6)–(8)).

For an inner solution δ*(θ) that is a fixed point δ* = Φ(δ*, θ) and an outer loss L(δ, θ), the
implicit function theorem gives dL/dθ = ∂L/∂θ + (∂Φ/∂θ)ᵀ (I − ∂Φ/∂δ)⁻ᵀ ∂L/∂δ. The inverse is
approximated by K terms of its Neumann series: v₀ = 0, v_{k+1} = (∂Φ/∂δ)ᵀ v_k + ∂L/∂δ.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def hypergradient(inner_map: Callable[[PyTree, PyTree], PyTree], outer_loss: Callable[[PyTree, PyTree], jax.Array],
                  delta: PyTree, params: PyTree, iterations: int) -> PyTree:
  """dL(δ*(θ), θ)/dθ at ``delta`` (taken as the fixed point of ``inner_map(·, params)``) with
  ``iterations`` = K Neumann terms; both maps are differentiated with ``jax.vjp``."""
  delta_grad, params_grad = jax.grad(outer_loss, argnums=(0, 1))(delta, params)
  _, pullback = jax.vjp(inner_map, delta, params)

  def neumann(v, _):
    through_delta, _ = pullback(v)
    return jax.tree.map(jnp.add, through_delta, delta_grad), None

  v, _ = jax.lax.scan(neumann, jax.tree.map(jnp.zeros_like, delta), None, length=iterations)
  _, through_params = pullback(v)
  return jax.tree.map(jnp.add, params_grad, through_params)
