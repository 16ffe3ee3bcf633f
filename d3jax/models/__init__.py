"""Flax Linen classifiers: ``get_model(name, num_classes, **options)``.

Every model is called as ``model.apply(variables, x, train=False)`` on normalized float32
NHWC images and returns logits (N, num_classes). BatchNorm statistics live in the
``batch_stats`` collection (pass ``mutable=['batch_stats']`` when ``train=True``); VGG's
dropout draws from the ``'dropout'`` rng stream in train mode only. The classifier head of
every model is the Dense submodule ``linear`` (parameter path ``linear/kernel``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from d3jax.models.conv import LOWERINGS, Conv
from d3jax.models.precision import PRECISIONS, with_precision
from d3jax.models.preact_resnet import PreActBlock, PreActResNet18
from d3jax.models.small_cnn import SmallCNN
from d3jax.models.vgg import VGG, adaptive_avg_pool
from d3jax.models.vit import ViT

# name -> (module class, fields fixed by the name).
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "small_cnn": (SmallCNN, {}),
    "preact_resnet18": (PreActResNet18, {}),
    "vgg11": (VGG, {"depth": 11, "batch_norm": False}),
    "vgg19_bn": (VGG, {"depth": 19, "batch_norm": True}),
    "vit": (ViT, {}),
    "vit_b16": (ViT, {"patch_size": 16, "width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072}),
}
_OPTIONAL = ("hidden", "mlp_dim", "resize")  # positive integers or None (the default)
MODELS: tuple[str, ...] = tuple(_REGISTRY)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_option(name: str, key: str, value: Any) -> None:
  if key == "conv":
    valid, expected = value in LOWERINGS, f"one of {LOWERINGS}"
  elif key == "precision":
    valid, expected = value in PRECISIONS, f"one of {PRECISIONS}"
  elif key == "small_input":
    valid, expected = isinstance(value, bool), "True or False"
  else:  # width, depth, ...: positive integers (those of _OPTIONAL may also be None)
    valid = (_is_int(value) and value >= 1) or (key in _OPTIONAL and value is None)
    expected = "a positive integer" + (" or None" if key in _OPTIONAL else "")
  if not valid:
    raise ValueError(f"{name}: option {key} must be {expected}, got {value!r}.")


def get_model(name: str, num_classes: int, **options: Any) -> nn.Module:
  """Builds the classifier ``name`` (one of :data:`MODELS`) with ``num_classes`` outputs.

  Options: ``small_cnn``: width=32; ``preact_resnet18``: width=64;
  ``vgg11``/``vgg19_bn``: width=64, small_input=False, hidden=None; ``vit``: patch_size=16,
  width=768, depth=12, heads=12, mlp_dim=None, resize=None (``vit_b16``: resize only). Every model takes
  ``conv="auto" | "lax" | "im2col" | "winograd"``, the convolution lowering (:mod:`d3jax.models.conv`),
  and ``precision="f32" | "bf16"``, the products' precision (:mod:`d3jax.models.precision`; a
  training recipe's ``precision`` field sets it for that training only).

  Raises:
    ValueError: unknown name, num_classes < 2, an unknown option or an invalid value.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODELS)}.")
  if not (_is_int(num_classes) and num_classes >= 2):
    raise ValueError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}.")
  cls, fixed = _REGISTRY[name]
  allowed = [field.name for field in dataclasses.fields(cls)
             if field.name not in ("parent", "name", "num_classes", *fixed)]
  for key, value in options.items():
    if key not in allowed:
      raise ValueError(
          f"{name}: unknown option {key!r}; valid options: {', '.join(allowed)}.")
    _check_option(name, key, value)
  return cls(num_classes=num_classes, **fixed, **options)


__all__ = ["Conv", "LOWERINGS", "MODELS", "PRECISIONS", "PreActBlock", "PreActResNet18", "SmallCNN", "VGG", "ViT",
           "adaptive_avg_pool", "get_model", "with_precision"]
