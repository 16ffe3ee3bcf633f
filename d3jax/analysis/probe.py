"""Reading a layer inside any Flax Linen model without editing it (``nn.intercept_methods``).

Layers are named by their module path, '/'-joined as in parameter paths (``conv4``,
``layer4_1/conv2``, ``linear``). The interceptor records a module's input or output during
``model.apply``; for Grad-CAM it also adds a zero tensor to the output, whose gradient is the
gradient of the logits with respect to that layer's activations.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.data.augment import normalize
from d3jax.models.conv import Conv
from d3jax.engine.train import Normalization

HEAD = "linear"  # every d3jax model's classifier head; its input is the penultimate feature


def _layer_path(module: nn.Module) -> str:
  return "/".join(module.path)


def _interceptor(layer: str, record: list, where: str, delta: jax.Array | None = None):
  def intercept(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or _layer_path(context.module) != layer:
      return next_fun(*args, **kwargs)
    if where == "input":
      record.append(args[0])
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if delta is not None:
      out = out + delta
    record.append(out)
    return out
  return intercept


def apply_probed(model: nn.Module, variables: Any, x: jax.Array, layer: str, where: str = "output",
                 delta: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(logits, the ``input`` or ``output`` of module ``layer``) in eval mode on normalized ``x``;
  ``delta`` is added to the layer's output (zeros: a handle for its gradient)."""
  record: list = []
  with nn.intercept_methods(_interceptor(layer, record, where, delta)):
    logits = model.apply(variables, x, train=False)
  if len(record) != 1:
    raise ValueError(f"layer {layer!r} was called {len(record)} times in one forward pass; name one "
                     "module called once (see conv_layers).")
  return logits, record[0]


def conv_layers(model: nn.Module, variables: Any, image_shape: tuple[int, ...]) -> list[str]:
  """The paths of the model's convolutions, in the order of the forward pass."""
  found: list[str] = []

  def intercept(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (Conv, nn.Conv)):
      found.append(_layer_path(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1,) + tuple(image_shape)), train=False))
  return found


def last_conv(model: nn.Module, variables: Any, image_shape: tuple[int, ...]) -> str:
  """The path of the model's last convolution (the layer of Grad-CAM and TAC)."""
  layers = conv_layers(model, variables, image_shape)
  if not layers:
    raise ValueError(f"{type(model).__name__} has no convolution; Grad-CAM and TAC need one.")
  return layers[-1]


@functools.partial(jax.jit, static_argnames=("model", "layer", "where", "batch_size"))
def _probe_batches(model, variables, images, mean, std, layer, where, batch_size):
  n = images.shape[0]
  batches = math.ceil(n / batch_size)
  padded = jnp.resize(images, (batches * batch_size,) + images.shape[1:])

  def one(batch):
    return apply_probed(model, variables, normalize(batch, mean, std), layer, where)[1]

  out = jax.lax.map(one, padded.reshape((batches, batch_size) + images.shape[1:]))
  return out.reshape((batches * batch_size,) + out.shape[2:])[:n]


def activations(model: nn.Module, variables: Any, images: np.ndarray, normalization: Normalization,
                layer: str, where: str = "output", batch_size: int = 250) -> np.ndarray:
  """The ``input`` or ``output`` of ``layer`` on uint8 NHWC ``images`` (eval mode), in batches."""
  images = jnp.asarray(images)
  return np.asarray(_probe_batches(model, variables, images, jnp.asarray(normalization.mean),
                                   jnp.asarray(normalization.std), layer, where,
                                   min(batch_size, images.shape[0])))


def penultimate(model: nn.Module, variables: Any, images: np.ndarray,
                normalization: Normalization) -> np.ndarray:
  """Penultimate features: the input of the ``linear`` head, (N, D)."""
  return activations(model, variables, images, normalization, HEAD, "input")
