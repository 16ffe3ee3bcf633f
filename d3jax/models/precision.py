"""Product precision of the models: ``"f32"`` (the default) or ``"bf16"`` mixed precision.

With ``"bf16"`` only the inputs of the matrix products and convolutions are rounded to bfloat16;
every product accumulates and returns float32 (``preferred_element_type``), so activations,
parameters, BatchNorm and its statistics, the loss, gradients' sums and every optimizer state
stay float32. This is the mixed-precision policy of mixed-precision training (Micikevicius et al.,
"Mixed Precision Training", ICLR 2018, Sec. 3: low-precision products, float32 master weights and
accumulation) with bfloat16 instead of float16, so no loss scaling is needed (bfloat16 keeps
float32's exponent range). Casts sit directly at the products, where XLA fuses them into the
operand's producer; casting whole activations or parameters instead (a "naive" bf16 model, BN
included) was slower than float32 on CPU.

``"f32"`` runs the products exactly as before the option existed (the same XLA program), so
float32 results do not change.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

Precision = Literal["f32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: Any) -> None:
  """Raises ValueError unless ``precision`` is one of :data:`PRECISIONS`."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")


def product_inputs(precision: str, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The operands of a product as the product reads them: rounded to bfloat16 under ``"bf16"``."""
  if precision == "bf16":
    return tuple(a.astype(jnp.bfloat16) for a in arrays)
  return arrays


def accumulation(precision: str) -> dict[str, Any]:
  """The keyword that makes a bf16 product accumulate and return float32 (none for f32)."""
  return {"preferred_element_type": jnp.float32} if precision == "bf16" else {}


def matmul(a: jax.Array, b: jax.Array, precision: str) -> jax.Array:
  """``a @ b`` at ``precision`` (float32 result either way)."""
  a, b = product_inputs(precision, a, b)
  return jnp.matmul(a, b, **accumulation(precision))


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  del preferred_element_type  # always float32
  lhs, rhs = product_inputs("bf16", lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                             preferred_element_type=jnp.float32)


def dense(features: int, name: str, precision: str = "f32", **kwargs: Any) -> nn.Dense:
  """``nn.Dense`` whose product runs at ``precision`` (its parameters stay float32)."""
  if precision == "bf16":
    kwargs["dot_general"] = _bf16_dot_general
  return nn.Dense(features, name=name, **kwargs)


def with_precision(model: nn.Module, precision: str) -> nn.Module:
  """``model`` with its products at ``precision``: a clone with the ``precision`` field set.

  Raises:
    ValueError: an unknown precision, or ``"bf16"`` for a model without a ``precision`` field.
  """
  check_precision(precision)
  if getattr(model, "precision", "f32") == precision:
    return model
  if not hasattr(model, "precision"):
    raise ValueError(f"precision {precision!r} needs a model with a precision field; "
                     f"{type(model).__name__} has none (the d3jax models all have one).")
  return model.clone(precision=precision)
