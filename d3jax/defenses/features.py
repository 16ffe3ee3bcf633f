"""Reading a model's intermediate inputs, for defenses that act on features (FP)."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.augment import normalize
from d3jax.train import Normalization


def module_input(model: nn.Module, variables: Any, x: jax.Array, name: str) -> jax.Array:
  """The first positional input of the submodule called ``name`` in an eval-mode forward pass of
  normalized images ``x`` (e.g. the penultimate features, the input of ``linear``)."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == name and context.method_name == "__call__":
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)
  if not captured:
    raise ValueError(f"the model has no submodule called {name!r}.")
  return captured[0]


@functools.partial(jax.jit, static_argnames=("model", "name", "batch_size"))
def _inputs_in_batches(model: nn.Module, variables: Any, images: jax.Array, mean: jax.Array,
                       std: jax.Array, name: str, batch_size: int) -> jax.Array:
  n = images.shape[0]
  num_batches = math.ceil(n / batch_size)
  padded = jnp.resize(images, (num_batches * batch_size,) + images.shape[1:])
  batches = padded.reshape((num_batches, batch_size) + images.shape[1:])
  out = jax.lax.map(lambda b: module_input(model, variables, normalize(b, mean, std), name), batches)
  return out.reshape((num_batches * batch_size,) + out.shape[2:])[:n]


def head_inputs(model: nn.Module, variables: Any, images: np.ndarray, normalization: Normalization,
                name: str = "linear", batch_size: int = 500) -> np.ndarray:
  """Eval-mode inputs of submodule ``name`` for uint8 NHWC ``images``, in fixed-size batches."""
  images = jnp.asarray(images)
  return np.asarray(_inputs_in_batches(model, variables, images, jnp.asarray(normalization.mean),
                                       jnp.asarray(normalization.std), name,
                                       min(batch_size, images.shape[0])))
