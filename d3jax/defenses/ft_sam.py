"""FT-SAM — fine-tuning with adaptive sharpness-aware minimisation (Zhu, Wei, Zha & Wu, "Enhancing
fine-tuning based backdoor defense with sharpness-aware minimization", ICCV 2023, Algorithm 1).

Every parameter (BN scales and biases included) is trained with ASAM (:func:`d3jax.optim.sam.
adaptive_sam`, T_w = |w|) around BackdoorBench's SGD (lr 0.01, momentum 0.9, weight decay 5e-4) on
cross-entropy with label smoothing 0.1, ρ = 2 (the paper's CIFAR-10 setting, §4.1), 100 epochs of
batch 256, BN in train mode for the first pass and with frozen running statistics for the second
(:class:`d3jax.engine.sharpness.SAMProgram`), the last model kept.

As released (BackdoorBench's ``defense/ft-sam.py``): the smoothed target puts 1 − s on the label
and s/(C − 1) on every other class; the cosine schedule is stepped after every *iteration* with
T_max = 100, so the learning rate 0.005·(1 + cos(π t/100)) cycles every 200 iterations; ρ is
constant. The paper draws the reserved set class-balanced (``choose_by_class``); here the caller
draws it (``d3jax.data.draw_reserved(..., class_balanced=True)`` does that), since a defense only
receives the reserved set. Deviations: fp32; the loss reported is the smoothed cross-entropy (the
reference's KL divergence differs from it by a constant, with the same gradient).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from d3jax.optim.sam import adaptive_sam
from d3jax.reductions import masked_mean
from d3jax.engine.sharpness import SAMProgram
from d3jax.engine.train import Hyperparams, SGDConfig, sgd_with_weight_decay


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                           smoothing: jax.Array) -> jax.Array:
  """Masked mean of −Σ_c t_c log softmax_c with t = 1 − s on the label and s/(C − 1) elsewhere."""
  classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, classes)
  targets = onehot * (1.0 - smoothing) + (1.0 - onehot) * smoothing / (classes - 1)
  per_sample = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  return masked_mean(per_sample, mask)


def cosine_per_step(base_lr: jax.Array, t_max: int) -> optax.Schedule:
  """PyTorch ``CosineAnnealingLR`` stepped every iteration (periodic beyond T_max)."""
  return lambda count: base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * count / t_max))


@dataclasses.dataclass(frozen=True)
class FTSAMConfig(SGDConfig):
  """FT-SAM defaults for CIFAR-10 (GTSRB and Tiny-ImageNet use ρ = 8 and no smoothing).
  ``rho``, ``label_smoothing``, ``learning_rate`` and ``weight_decay`` are sweepable."""
  rho: float = 2.0
  label_smoothing: float = 0.1
  program_class = SAMProgram  # not a field: the program this recipe runs in

  def __post_init__(self) -> None:
    super().__post_init__()
    if not self.rho > 0:
      raise ValueError(f"rho must be > 0, got {self.rho!r}.")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")

  def hyperparams(self) -> dict[str, jax.Array]:
    return {**super().hyperparams(), "rho": jnp.float32(self.rho),
            "label_smoothing": jnp.float32(self.label_smoothing)}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    return smoothed_cross_entropy(logits, labels, mask, hparams["label_smoothing"])

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    del steps_per_epoch
    schedule = cosine_per_step(hparams["learning_rate"], self.cosine_t_max)
    base = sgd_with_weight_decay(schedule, hparams["weight_decay"], self.momentum)
    return adaptive_sam(base, hparams["rho"])
