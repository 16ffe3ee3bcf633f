"""Tensor norms for D3's distance and projection, with gradients safe at zero.

The official code measures the distance of one selected tensor as ‖W − W0‖_p on the flattened tensor (p = 2,
i.e. Frobenius). We also offer L1 and the nuclear norm (a conv kernel HWIO is viewed as the
(H·W·I, O) matrix; a 1-D tensor as a column). The gradient at an exactly-zero argument is 0,
as PyTorch defines the gradient of ``torch.norm`` at zero, never NaN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NORMS = ("fro", "l1", "nuclear")


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}.")


def as_matrix(x: jax.Array) -> jax.Array:
  """The matrix view used by the nuclear norm: all leading axes flattened, last axis kept."""
  if x.ndim == 0:
    return x.reshape(1, 1)
  if x.ndim == 1:
    return x.reshape(-1, 1)
  return x.reshape(-1, x.shape[-1])


def tensor_norm(x: jax.Array, norm: str) -> jax.Array:
  """‖x‖ as a scalar: Frobenius (flattened L2), L1 (sum of |x|), or nuclear (sum of singular values).

  Differentiating it gives :func:`norm_gradient` (0, not NaN, at x = 0).
  """
  check_norm(norm)
  return _tensor_norm(norm, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _tensor_norm(norm: str, x: jax.Array) -> jax.Array:
  if norm == "fro":
    return jnp.sqrt(jnp.sum(jnp.square(x)))
  if norm == "l1":
    return jnp.sum(jnp.abs(x))
  return jnp.sum(jnp.linalg.svd(as_matrix(x), compute_uv=False))


@_tensor_norm.defjvp
def _tensor_norm_jvp(norm: str, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
  (x,), (dx,) = primals, tangents
  return _tensor_norm(norm, x), jnp.sum(norm_gradient(x, norm) * dx)


def norm_gradient(x: jax.Array, norm: str) -> jax.Array:
  """∂‖x‖/∂x, with the value 0 where the norm is not differentiable at x = 0.

  fro: x/‖x‖ (0 at x = 0); l1: sign(x) (0 where x = 0); nuclear: U·Vᵀ over the non-zero
  singular values (the minimal-norm subgradient, 0 at x = 0).
  """
  check_norm(norm)
  if norm == "fro":
    length = jnp.sqrt(jnp.sum(jnp.square(x)))
    return jnp.where(length > 0, x / jnp.where(length > 0, length, 1.0), 0.0)
  if norm == "l1":
    return jnp.sign(x)
  u, s, vt = jnp.linalg.svd(as_matrix(x), full_matrices=False)
  tolerance = jnp.finfo(x.dtype).eps * max(as_matrix(x).shape) * jnp.max(s, initial=0.0)
  keep = (s > tolerance) & (s > 0)
  return ((u * keep) @ vt).reshape(x.shape)
