"""D3 — Distance-Driven Detoxification (paper Eq. (4); official code, spec §5).

Fine-tune every parameter on the reserved clean set with the per-sample hinge
mean_i max(0, CE_i − ε) while pushing the selected weights away from their backdoored values
(distance summed over selected tensors, not squared) and projecting them back onto their
original norm after every step (:func:`d3jax.optim.d3`). SGD momentum 0.9 without weight decay,
cosine annealing with T_max = epochs stepped per epoch, BN in train mode, last model kept.

Presets:
  * ``paper`` (default): λ = 10, ε = 0.1, Frobenius, the classifier head ``linear/kernel``
    (paper §4.1: "weights of the linear layers").
  * ``official``: the released config (spec §5.1), λ = 0.5.
Deliberate deviations: fp32 (no AMP); the reserved set is drawn with a JAX key, not python
``random`` (spec §1.5); the last partial batch is padded by wrapping and masked (BN statistics of
that batch see the few wrapped samples twice).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from d3jax import optim
from d3jax.optim.norms import check_norm, tensor_norm
from d3jax.train import FineTune, Hyperparams, Normalization, cosine_per_epoch

WarmUp = Literal["random", "near", "middle", "far", "noise"]
WARM_UPS = ("random", "near", "middle", "far", "noise")
PRESETS = ("paper", "official")


@dataclasses.dataclass(frozen=True)
class D3Config:
  """D3 settings; ``lmd``, ``eps`` and ``learning_rate`` are sweepable hyperparameters."""
  lmd: float = 10.0
  eps: float = 0.1
  norm: str = "fro"
  select: Any = "linear/kernel"
  warm_up: WarmUp = "random"
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 0.01
  momentum: float = 0.9
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True

  def __post_init__(self) -> None:
    check_norm(self.norm)
    if self.warm_up not in WARM_UPS:
      raise ValueError(f"unknown warm_up {self.warm_up!r}; choose one of {WARM_UPS}.")

  @classmethod
  def preset(cls, name: str, **overrides) -> "D3Config":
    """``paper`` (λ = 10) or ``official`` (λ = 0.5, the released config), then ``overrides``."""
    if name not in PRESETS:
      raise ValueError(f"unknown D3 preset {name!r}; choose one of {PRESETS}.")
    base = {"paper": {}, "official": {"lmd": 0.5}}[name]
    return cls(**{**base, **overrides})


def hyperparams(config: D3Config) -> Hyperparams:
  return {name: jnp.float32(getattr(config, name)) for name in ("lmd", "eps", "learning_rate")}


def warm_start(params: Any, select: Any, method: str, norm: str, key: jax.Array) -> Any:
  """Initial values of the selected tensors (spec §5.4); everything else keeps its value.

  random: U(−0.5, 0.5) rescaled to ‖W0‖ (a random direction at the original norm); near: W0;
  middle: 0; far: −W0; noise: W0 + N(0, 1)·std(W0) (unbiased std).
  """
  if method not in WARM_UPS:
    raise ValueError(f"unknown warm_up {method!r}; choose one of {WARM_UPS}.")
  mask = optim.select_mask(params, select)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for leaf, selected, leaf_key in zip(leaves, jax.tree.leaves(mask), keys):
    if not selected or method == "near":
      out.append(leaf)
    elif method == "random":
      direction = jax.random.uniform(leaf_key, leaf.shape, leaf.dtype, -0.5, 0.5)
      out.append(direction * tensor_norm(leaf, norm) / tensor_norm(direction, norm))
    elif method == "middle":
      out.append(jnp.zeros_like(leaf))
    elif method == "far":
      out.append(-leaf)
    else:  # noise
      out.append(leaf + jax.random.normal(leaf_key, leaf.shape, leaf.dtype) * jnp.std(leaf, ddof=1))
  return jax.tree.unflatten(treedef, out)


def program(model: nn.Module, normalization: Normalization, config: D3Config) -> FineTune:
  def loss(logits, labels, mask, hparams):
    per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optim.clean_hinge(per_sample, hparams["eps"], mask)

  def optimizer(reference, hparams, steps_per_epoch):
    schedule = cosine_per_epoch(hparams["learning_rate"], steps_per_epoch, config.epochs)
    return optim.d3(reference, config.select, schedule, config.momentum, hparams["lmd"], config.norm)

  def start(params, hparams, key):
    del hparams
    return warm_start(params, config.select, config.warm_up, config.norm, key)

  return FineTune(model=model, loss=loss, optimizer=optimizer, epochs=config.epochs,
                  batch_size=config.batch_size, normalization=normalization,
                  crop_padding=config.crop_padding, flip=config.flip, train_mode=config.train_mode,
                  warm_start=start)
