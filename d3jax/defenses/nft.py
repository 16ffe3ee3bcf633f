"""NFT — Neural mask Fine-Tuning (Karim, Arafat, Rakin, Guo & Rahnavard, "Augmented neural
fine-tuning for efficient backdoor purification", ECCV 2024, §3.2–3.3, Eq. (4)–(6)).

Only per-channel masks on the BN scales inside the residual blocks train (every other parameter is
frozen): γ = γ₀ ⊙ m, m from 1, clamped after every step to [μ(l), 1], μ(l) = 0.8·exp(−0.5·l) for
the l-th masked BN (:func:`d3jax.optim.masks.neuron_masks`). The loss is MixUp cross-entropy
(one λ ~ Beta(1, 1) per batch, partners by a permutation of the batch, after the usual crop and
flip) plus (0.001/N_c)·Σ_l ‖1 − m_l‖₁, N_c the reserved samples per class. SGD lr 0.05, momentum
0.95, no weight decay, BN in train mode (batch statistics; running statistics updated). The masks
are folded into the BN scales, so the defended variables load in the plain model.

The released ``src/Remove_Backdoor.py`` crashes as published; this is what it means to do.
Deviations: it draws 1,000 batches of 128 with replacement in 5 rounds, the rate following a
cosine from 0.05 to 0.02 stepped per round; here ``epochs`` passes over the reserved set (50 × 20
batches of 128 on 5% of CIFAR-10 ≈ its 1,000 steps) with that cosine stepped per epoch,
lr_e = 0.02 + 0.03·½(1 + cos(π e/epochs)). ``select`` picks the masked scales: by default every
BN scale, which in PreAct-ResNet18 is exactly the 16 BNs inside its blocks (it has no stem BN and
no BN in its shortcuts; NFT's ResNet-18 has 19 with the shortcut BNs), and in the small CNN its four.
The loss reported is the MixUp cross-entropy plus the L1 term.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d3jax.data.augment import augment, normalize
from d3jax.optim.masks import mask_penalty, neuron_masks
from d3jax.defenses.checks import check_fields, check_select
from d3jax.engine.train import (Batch, Hyperparams, Program, TrainState, cross_entropy,
                         join_variables)
from d3jax.engine.train import Precision

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class NFTProgram(Program):
  """The engine's program with NFT's MixUp step and its L1 penalty on the masks."""

  def init(self, variables: PyTree, n: int, key: jax.Array, hparams: Hyperparams | None = None
           ) -> TrainState:
    """As :meth:`Program.init`; also records the reserved set's size n (for N_c = n/C)."""
    state = super().init(variables, n, key, hparams)
    return state.replace(hparams={**state.hparams, "reserved_size": jnp.float32(n)})

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    recipe, hparams = self.recipe, state.hparams
    augment_key, lam_key, perm_key, dropout_key = jax.random.split(self.step_key(state), 4)
    x = augment(batch.image, augment_key, crop_padding=recipe.crop_padding, flip=recipe.flip)
    x = normalize(x, self.normalization.mean, self.normalization.std)
    lam = jax.random.beta(lam_key, hparams["mixup_alpha"], hparams["mixup_alpha"])
    partner = jax.random.permutation(perm_key, x.shape[0])
    mixed = lam * x + (1.0 - lam) * x[partner]

    def objective(params):
      logits, updated = self.model.apply(
          join_variables(params, state.batch_stats), mixed, train=recipe.train_mode,
          mutable=["batch_stats"], rngs={"dropout": dropout_key})
      loss = (lam * cross_entropy(logits, batch.label, batch.mask, hparams)
              + (1.0 - lam) * cross_entropy(logits, batch.label[partner], batch.mask, hparams))
      per_class = hparams["reserved_size"] / logits.shape[-1]
      return loss + hparams["l1"] / per_class * mask_penalty(params, state.opt_state), updated

    (loss, updated), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = self.apply_gradients(state, grads, updated.get("batch_stats", state.batch_stats))
    return state, {"loss": loss}


@dataclasses.dataclass(frozen=True)
class NFTConfig:
  """NFT settings; every numeric one but the schedule's is sweepable. ``select`` is a regular
  expression fully matched against '/'-joined parameter paths."""
  select: str = r".*bn\d*/scale"
  clamp_alpha: float = 0.8
  clamp_beta: float = 0.5
  l1: float = 0.001
  mixup_alpha: float = 1.0
  learning_rate: float = 0.05
  final_learning_rate: float = 0.02
  momentum: float = 0.95
  epochs: int = 50
  batch_size: int = 128
  crop_padding: int = 4
  flip: bool = True
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation
  program_class = NFTProgram  # not a field: the program this recipe runs in

  def __post_init__(self) -> None:
    check_select(self.select)
    check_fields(self, nonnegative=("clamp_beta", "l1", "learning_rate", "final_learning_rate"),
                 positive=("clamp_alpha", "mixup_alpha"), unit=("clamp_alpha",))

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name))
            for name in ("clamp_alpha", "clamp_beta", "l1", "mixup_alpha", "learning_rate",
                         "final_learning_rate", "momentum")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    """Plain cross-entropy (the MixUp loss lives in :meth:`NFTProgram.step`)."""
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    high, low = hparams["learning_rate"], hparams["final_learning_rate"]

    def schedule(count):
      epoch = count // steps_per_epoch
      return low + (high - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / self.epochs))

    return neuron_masks(optax.sgd(schedule, momentum=hparams["momentum"]), self.select,
                        hparams["clamp_alpha"], hparams["clamp_beta"])

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    del key
    return params
