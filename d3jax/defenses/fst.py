"""FST — Feature Shift Tuning (Min, Liu, Yang & Wang, "Towards stable backdoor purification
through feature shift tuning", NeurIPS 2023, Eq. (3)).

The classifier head is re-initialised (kernel and bias ~ U(−1/√fan_in, 1/√fan_in)), then every
parameter is fine-tuned on CE + α·⟨W, W₀⟩_F, W₀ the backdoored head kernel
(:func:`d3jax.optim.fst.feature_shift`), and after every step the head kernel is rescaled to
‖W₀‖_F (:func:`d3jax.optim.project_norm`). The bias is neither regularised nor projected.

Defaults are the paper's CIFAR-10 setting and the released ``fine_tune/ft.py --ft_mode fst``:
α = 0.2, lr 0.01, 10 epochs, SGD momentum 0.9 without weight decay, cosine annealing with
T_max = epochs stepped per epoch, batch 128, BN in train mode, random crop with padding 4, the
last model kept. (The paper uses lr 0.001 and α = 0.001 on CIFAR-100 and Tiny-ImageNet.)
Deviations: the loss reported is the cross-entropy alone (the α term only enters the gradient);
the reserved set is whatever the caller passes (the paper tunes on 2% of the training set).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d3jax.optim.d3 import project_norm
from d3jax.optim.fst import feature_shift
from d3jax.defenses.checks import check_fields
from d3jax.engine.train import Hyperparams, cosine_per_epoch, cross_entropy
from d3jax.engine.train import Precision

PyTree = Any


def reinitialise_head(params: PyTree, head: str, key: jax.Array) -> PyTree:
  """``params`` with module ``head``'s kernel and bias redrawn from U(−1/√fan_in, 1/√fan_in)
  (PyTorch's ``nn.Linear`` initialisation); the kernel is (fan_in, classes)."""
  if head not in params or "kernel" not in params[head]:
    raise ValueError(f"head={head!r} is not a dense module of the model; its top-level modules are "
                     f"{', '.join(sorted(params))}.")
  module = dict(params[head])
  bound = 1.0 / jnp.sqrt(module["kernel"].shape[0])
  keys = jax.random.split(key, len(module))
  for (name, value), leaf_key in zip(sorted(module.items()), keys):
    module[name] = jax.random.uniform(leaf_key, value.shape, value.dtype, -bound, bound)
  return {**params, head: module}


@dataclasses.dataclass(frozen=True)
class FSTConfig:
  """FST settings; ``alpha``, ``learning_rate`` and ``momentum`` are sweepable. ``head`` names
  the classifier module (``linear`` in every d3jax model)."""
  alpha: float = 0.2
  head: str = "linear"
  epochs: int = 10
  batch_size: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation

  def __post_init__(self) -> None:
    check_fields(self, nonnegative=("alpha", "learning_rate"))

  @property
  def select(self) -> str:
    return f"{self.head}/kernel"

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name)) for name in ("alpha", "learning_rate", "momentum")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    schedule = cosine_per_epoch(hparams["learning_rate"], steps_per_epoch, self.epochs)
    return optax.chain(feature_shift(hparams["alpha"], self.select),
                       optax.sgd(schedule, momentum=hparams["momentum"]),
                       project_norm(None, self.select, "fro"))

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    return reinitialise_head(params, self.head, key)
