"""ANP — Adversarial Neuron Pruning (Wu & Wang, "Adversarial neuron pruning purifies backdoored deep
models", NeurIPS 2021, Eq. (3)–(5), Algorithm 1), as BackdoorBench's ``defense/anp.py`` runs it.

Every BN channel gets a mask m ∈ [0, 1] (from 1) on its scale, and, per step, adversarial noise
δ, ξ ~ U(−ε, ε) on its scale and shift: the perturbed BN computes γ·(m + δ) and β·(1 + ξ). Each
step first takes one signed ascent step on the noise (δ += ε·sign ∂CE/∂δ, likewise ξ; no
clipping), then one SGD step (lr 0.01, momentum 0.9) on the masks only for
α·CE(natural) + (1 − α)·CE(perturbed), α = 0.2, ε = 0.4, and clamps m to [0, 1]; BN in train
mode (batch statistics). Then channels are pruned (γ set to 0 on the original model, β kept) for
every mask ≤ a threshold in 0, 0.05, …, 0.90.

Deliberate deviations from the reference:
* the threshold: BackdoorBench keeps the threshold with the lowest *test* ASR among those whose
  test accuracy fell by less than 10%. A defender has neither the test set nor the trigger; here
  the masks are trained on the reserved set minus a held-out split (``holdout``, 10%), and the
  rule is: going up the thresholds, keep the last one before the first whose accuracy on the
  held-out split is lower than the unpruned model's by ``acc_ratio`` of it or more (prune as much
  as clean accuracy allows; the unpruned model when even threshold 0 fails);
* the schedule: the reference draws 2,000 batches of 256 with replacement; here ``epochs``
  passes over the mask-training data (200 × ~9 batches on 90% of 5% of CIFAR-10);
* the masks are trained as :func:`d3jax.optim.masks.neuron_masks` with lower bound 0 (scale =
  γ₀·m, gradient γ₀·∂L/∂γ); BN running statistics are not updated (the pruned model keeps the
  original ones, as in the reference); fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.data.augment import augment, normalize
from d3jax.data.splits import split_holdout
from d3jax.defenses.checks import check_fields, check_select
from d3jax.optim.masks import neuron_masks
from d3jax.optim.selection import select_mask
from d3jax.engine.train import (Batch, EpochCallback, Hyperparams, Normalization, Program,
                         Restore, TrainState, cross_entropy, join_variables, predict, train)
from d3jax.engine.train import Precision

PyTree = Any


def _with_noise(params: PyTree, reference: PyTree, noise: tuple[PyTree, PyTree]) -> PyTree:
  """Params of the noisy BN: scale γ₀·m + γ₀·δ (= γ₀·(m + δ)), shift β·(1 + ξ), on the masked
  modules (the scale leaves where ``reference`` is set)."""
  scale_noise, shift_noise = noise

  def module(p, r, d, x):
    if not isinstance(p, dict):
      return p
    if isinstance(r, dict) and r.get("scale") is not None:
      return {**p, "scale": p["scale"] + r["scale"] * d["scale"], "bias": p["bias"] * (1 + x["scale"])}
    return {k: module(v, r.get(k) if isinstance(r, dict) else None,
                      d.get(k) if isinstance(d, dict) else None,
                      x.get(k) if isinstance(x, dict) else None) for k, v in p.items()}

  return module(params, reference, scale_noise, shift_noise)


@dataclasses.dataclass(frozen=True, eq=False)
class ANPProgram(Program):
  """The engine's program with ANP's step: noise ascent, then the mask step."""

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    recipe, hparams = self.recipe, state.hparams
    augment_key, scale_key, shift_key = jax.random.split(self.step_key(state), 3)
    x = augment(batch.image, augment_key, crop_padding=recipe.crop_padding, flip=recipe.flip)
    x = normalize(x, self.normalization.mean, self.normalization.std)
    reference = state.opt_state.reference
    eps = hparams["eps"]

    def draw(key):
      leaves, treedef = jax.tree.flatten(state.opt_state.masks)
      keys = jax.random.split(key, max(len(leaves), 1))
      return jax.tree.unflatten(treedef, [jax.random.uniform(k, m.shape, m.dtype, -eps, eps)
                                          for k, m in zip(keys, leaves)])

    def loss_at(params, noise):
      logits, _ = self.model.apply(join_variables(_with_noise(params, reference, noise), state.batch_stats),
                                   x, train=recipe.train_mode, mutable=["batch_stats"])
      return cross_entropy(logits, batch.label, batch.mask, hparams)

    noise = (draw(scale_key), draw(shift_key))
    ascent = jax.grad(loss_at, argnums=1)(state.params, noise)
    noise = jax.tree.map(lambda n, g: n + eps * jnp.sign(g), noise, ascent)
    zero = jax.tree.map(jnp.zeros_like, noise)

    def objective(params):
      return hparams["alpha"] * loss_at(params, zero) + (1 - hparams["alpha"]) * loss_at(params, noise)

    loss, grads = jax.value_and_grad(objective)(state.params)
    return self.apply_gradients(state, grads, state.batch_stats), {"loss": loss}


@dataclasses.dataclass(frozen=True)
class ANPConfig:
  """ANP settings. ``select`` matches the masked BN scales ('/'-joined paths). ANP runs in stages
  (mask training, then pruning), so it is not sweepable as one program; ``eps``, ``alpha``,
  ``learning_rate`` and ``momentum`` are arrays in its mask-training state."""
  eps: float = 0.4
  alpha: float = 0.2
  learning_rate: float = 0.01
  momentum: float = 0.9
  epochs: int = 200
  batch_size: int = 256
  pruning_max: float = 0.9
  pruning_step: float = 0.05
  acc_ratio: float = 0.1
  holdout: float = 0.1
  select: str = r".*bn\d*/scale"
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation

  def __post_init__(self) -> None:
    check_select(self.select)
    check_fields(self, nonnegative=("eps", "learning_rate"), unit=("alpha", "pruning_max"),
                 fractions=("pruning_step", "acc_ratio", "holdout"))

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name)) for name in ("eps", "alpha", "learning_rate", "momentum")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    del steps_per_epoch
    return neuron_masks(optax.sgd(hparams["learning_rate"], momentum=hparams["momentum"]),
                        self.select, 0.0, 0.0)

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    del key
    return params

  def thresholds(self) -> np.ndarray:
    return np.arange(0.0, self.pruning_max + 1e-9, self.pruning_step)

  def defend(self, model: nn.Module, variables: PyTree, images: np.ndarray, labels: np.ndarray, *,
             normalization: Normalization, key: jax.Array, progress: bool = True,
             callback: EpochCallback | None = None, restore: Restore | None = None
             ) -> tuple[PyTree, dict[str, Any]]:
    """Train the masks on the reserved set minus its held-out split, then prune by the largest
    threshold that keeps the held-out accuracy (none: the unpruned model, threshold None)."""
    split_key, mask_key = jax.random.split(key)
    rest, held = split_holdout(np.arange(len(labels)), self.holdout, split_key)
    masked, history = train(ANPProgram(model, self, normalization), variables, images[rest],
                            labels[rest], mask_key, desc="anp", progress=progress,
                            callback=callback, restore=restore)
    masks = channel_masks(variables["params"], masked["params"], self.select)
    candidates = [variables] + [{**variables, "params": prune_by_masks(variables["params"], masks, t)}
                                for t in self.thresholds()]
    accuracies = np.asarray([float(np.mean(predict(model, c, images[held], normalization) == labels[held]))
                             for c in candidates])
    passed = (accuracies[0] - accuracies) < self.acc_ratio * accuracies[0]
    chosen = len(passed) - 1 if passed.all() else int(np.argmin(passed)) - 1
    threshold = None if chosen == 0 else float(self.thresholds()[chosen - 1])
    pruned = 0 if threshold is None else sum(int(np.sum(m <= threshold)) for m in jax.tree.leaves(masks))
    return candidates[chosen], {"losses": history.get("loss", np.zeros(0)).tolist(),
                                "threshold": threshold, "pruned": pruned,
                                "holdout_acc": accuracies.tolist()}


def channel_masks(original: PyTree, masked: PyTree, select: str) -> PyTree:
  """m = γ_masked/γ₀ at the selected leaves (1 where γ₀ = 0), None elsewhere."""
  def one(p, q, selected):
    if not selected:
      return None
    p, q = np.asarray(p), np.asarray(q)
    return np.where(p == 0, 1.0, q / np.where(p == 0, 1.0, p))

  return jax.tree.map(one, original, masked, select_mask(original, select))


def prune_by_masks(original: PyTree, masks: PyTree, threshold: float) -> PyTree:
  """The original params with γ = 0 for every channel whose mask is ≤ ``threshold``."""
  def one(p, m):
    return p if m is None else np.where(m <= threshold, 0.0, np.asarray(p)).astype(np.asarray(p).dtype)

  return jax.tree.map(one, original, masks, is_leaf=lambda x: x is None)
