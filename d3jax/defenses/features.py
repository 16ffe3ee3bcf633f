"""Reading a model's intermediate inputs and outputs, for defenses that act on features (FP, NAD)."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.augment import normalize
from d3jax.engine.train import Normalization


def apply_recording(model: nn.Module, variables: Any, x: jax.Array, layers: Sequence[str],
                    where: str = "output", **kwargs: Any) -> tuple[Any, list[jax.Array]]:
  """``model.apply(variables, x, **kwargs)`` and the ``input`` (first positional argument) or
  ``output`` of each submodule in ``layers`` ('/'-joined module paths, e.g. ``layer3_1``,
  ``layer4_1/conv2``), in the order of ``layers``. Works under ``jax.grad`` and in train mode.

  Raises:
    ValueError: a layer that is not called exactly once in the forward pass.
  """
  record: dict[str, list[jax.Array]] = {layer: [] for layer in layers}

  def interceptor(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if context.method_name != "__call__" or path not in record:
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    record[path].append(args[0] if where == "input" else out)
    return out

  with nn.intercept_methods(interceptor):
    result = model.apply(variables, x, **kwargs)
  for layer, found in record.items():
    if len(found) != 1:
      raise ValueError(f"layer {layer!r} was called {len(found)} times in one forward pass; name a "
                       "module path (e.g. 'conv4', 'layer4_1') that is called exactly once.")
  return result, [record[layer][0] for layer in layers]


def module_input(model: nn.Module, variables: Any, x: jax.Array, name: str) -> jax.Array:
  """The first positional input of the submodule ``name`` in an eval-mode forward pass of
  normalized images ``x`` (e.g. the penultimate features, the input of ``linear``)."""
  return apply_recording(model, variables, x, (name,), "input", train=False)[1][0]


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
