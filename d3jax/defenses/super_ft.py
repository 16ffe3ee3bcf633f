"""Super-FT — super-convergence fine-tuning (Sha, He, Yu, Backes & Zhang, "Fine-tuning is all you
need to mitigate backdoor attacks", arXiv 2212.09067, 2022).

Every parameter is fine-tuned with plain SGD (no momentum, no weight decay) under a triangular
cyclic learning rate of period 20 iterations: from ``lr_base`` up to the peak in 10 iterations and
back in 10; the peak is ``lr_max1`` during the first ``switch_epoch`` epochs and ``lr_max2`` after.
The paper's authors released no code; the defaults are those of the one toolkit implementation,
backdoor-toolbox's ``other_defenses_tool_box/super_finetuning.py`` on CIFAR-10: lr_base 0.03,
peaks 2.5 then 0.05 (switch at epoch 40), 100 epochs, batch 128, and the rate is set after each
step, so the first step uses lr_base. (Its GTSRB setting is 0.003, 0.25, 0.005.) BN in train
mode, random crop with padding 4, the last model kept. Deviation: that toolkit fine-tunes on 2,000
images carved from the test set; here the caller's reserved clean training subset.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d3jax.defenses.checks import check_fields
from d3jax.engine.train import Hyperparams, cross_entropy
from d3jax.engine.train import Precision

PyTree = Any


def cyclic_rate(lr_base: Any, lr_max1: Any, lr_max2: Any, steps_per_epoch: Any, switch_epoch: int,
                half_period: int = 10) -> optax.Schedule:
  """Triangular cyclic rate: lr(t) = base + (peak − base)·(1 − |t mod 2h − h|/h), h = ``half_period``,
  peak = ``lr_max1`` for epochs < ``switch_epoch`` and ``lr_max2`` after (t counts iterations)."""
  def schedule(count):
    phase = jnp.mod(count, 2 * half_period)
    height = 1.0 - jnp.abs(phase - half_period) / half_period
    peak = jnp.where(count // steps_per_epoch < switch_epoch, lr_max1, lr_max2)
    return lr_base + (peak - lr_base) * height
  return schedule


@dataclasses.dataclass(frozen=True)
class SuperFTConfig:
  """Super-FT settings; ``lr_base``, ``lr_max1`` and ``lr_max2`` are sweepable."""
  lr_base: float = 0.03
  lr_max1: float = 2.5
  lr_max2: float = 0.05
  switch_epoch: int = 40
  epochs: int = 100
  batch_size: int = 128
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation

  def __post_init__(self) -> None:
    check_fields(self, nonnegative=("lr_base", "lr_max1", "lr_max2"))
    if isinstance(self.switch_epoch, bool) or not isinstance(self.switch_epoch, int) or self.switch_epoch < 0:
      raise ValueError(f"switch_epoch must be an integer ≥ 0, got {self.switch_epoch!r}.")

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name)) for name in ("lr_base", "lr_max1", "lr_max2")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    return optax.sgd(cyclic_rate(hparams["lr_base"], hparams["lr_max1"], hparams["lr_max2"],
                                 steps_per_epoch, self.switch_epoch))

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    del key
    return params
