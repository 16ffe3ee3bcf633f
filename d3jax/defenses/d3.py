"""D3 — Distance-Driven Detoxification (D3 paper, Eq. (4); supplement, Algorithm 1).

Fine-tune every parameter on the reserved clean set with the per-sample hinge
mean_i max(0, CE_i − ε) while pushing the selected weights away from their backdoored values
(distance summed over selected tensors, not squared) and projecting them back onto their
original norm after every step (:func:`d3jax.optim.d3`). As in the official code: SGD momentum
0.9 without weight decay, cosine annealing with T_max = epochs stepped per epoch, batch 256, BN in
train mode, the last model kept, and the selected weights start from a random direction at their
original norm (the ``random`` warm-up).

Presets:
  * ``paper`` (default): λ = 10, ε = 0.1, Frobenius, the classifier head ``linear/kernel``
    (paper §4.1: "weights of the linear layers").
  * ``official``: the released config file's λ = 0.5 (the rest as above).
Deliberate deviations: fp32 (the official code too ignores its AMP flag); the reserved set is
drawn with a JAX key, not Python's ``random``; the last partial batch is padded by wrapping and
masked (BN statistics of that batch see the few wrapped samples twice).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from d3jax import optim
from d3jax.optim.norms import check_norm, tensor_norm
from d3jax.engine.train import Hyperparams, check_recipe_fields, cosine_per_epoch
from d3jax.engine.train import Precision

WarmUp = Literal["random", "near", "middle", "far", "noise"]
WARM_UPS = ("random", "near", "middle", "far", "noise")
PRESETS = ("paper", "official")
PyTree = Any


@dataclasses.dataclass(frozen=True)
class D3Config:
  """D3 settings; ``lmd``, ``eps``, ``learning_rate`` and ``momentum`` are hyperparameters (arrays
  in the training state: sweepable).

  ``select`` is a regular expression fully matched against '/'-joined parameter paths (e.g.
  ``"linear/kernel"``, ``"layer4_.*/kernel"``).
  """
  lmd: float = 10.0
  eps: float = 0.1
  norm: Literal["fro", "l1", "nuclear"] = "fro"
  select: str = "linear/kernel"
  warm_up: WarmUp = "random"
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 0.01
  momentum: float = 0.9
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation

  def __post_init__(self) -> None:
    check_norm(self.norm)
    check_recipe_fields(self, ("lmd", "eps", "learning_rate"))
    if self.warm_up not in WARM_UPS:
      raise ValueError(f"unknown warm_up {self.warm_up!r}; choose one of {WARM_UPS}.")
    if not isinstance(self.select, str) or not self.select:
      raise ValueError(f"select must be a non-empty regular expression over parameter paths, got "
                       f"{self.select!r}.")

  @classmethod
  def preset(cls, name: str, **overrides) -> "D3Config":
    """``paper`` (λ = 10) or ``official`` (λ = 0.5, the released config), then ``overrides``."""
    if name not in PRESETS:
      raise ValueError(f"unknown D3 preset {name!r}; choose one of {PRESETS}.")
    base = {"paper": {}, "official": {"lmd": 0.5}}[name]
    return cls(**{**base, **overrides})

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name))
            for name in ("lmd", "eps", "learning_rate", "momentum")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return optim.clean_hinge(per_sample, hparams["eps"], mask)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    schedule = cosine_per_epoch(hparams["learning_rate"], steps_per_epoch, self.epochs)
    return optim.d3(None, self.select, schedule, hparams["momentum"], hparams["lmd"], self.norm)

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    return warm_start(params, self.select, self.warm_up, self.norm, key)


def warm_start(params: PyTree, select: Any, method: str, norm: str, key: jax.Array) -> PyTree:
  """Initial values of the selected tensors (the official code's warm-up methods); everything
  else keeps its value.

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
