"""SAU — Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, "Shared adversarial unlearning:
backdoor mitigation by unlearning shared adversarial examples", NeurIPS 2023: the shared
adversarial risk, its relaxed unlearning objective and the SAU algorithm of its method section),
as BackdoorBench's ``defense/sau.py`` runs it.

The model is trained while a frozen copy of the backdoored model, f_ref, stays as it was (its
params live in the optimizer state, :func:`d3jax.optim.keep_reference`). Both are in eval mode
(BN running statistics, never updated). Per batch of the reserved set (no augmentation):

1. Shared PGD in [0, 1] pixel space, L∞ radius ε = 0.2: δ starts at +ε everywhere, then 5 steps
   δ ← clip(δ − 0.2·sign ∇_δ L, −ε, ε) on L = 0.01·L_adv + 1·L_share, where, with x' = x + δ,
   "fooled" meaning a model's prediction on x' differs from its prediction on x, and "shared"
   meaning both are fooled to the same label:
   L_adv = −[Σ_{f not fooled} CE(f(x'), y) + Σ_{f_ref not fooled} CE(f_ref(x'), y)]/(2B) and
   L_share = (1/B)·Σ_{not shared} JS(softmax f(x'), softmax f_ref(x')) (probabilities ≥ 1e-8).
2. One AMSGrad step (Adam lr 1e-4, betas 0.9, 0.999) on
   1·CE(f(x), y) + 0·CE(f(x'), y) + 1·L_shared, where for the samples whose x' fools f_ref to a
   wrong label c = f_ref(x') (c ≠ y and c ≠ f_ref(x)),
   L_shared = (1/2B)·Σ [−log(1e-6 + min(1 − p_c, 0.999)) − log(1 + 1e-6 − max(p_c, 0.001))],
   p = softmax f(x'): the relaxed shared-adversarial risk, pushing f off f_ref's adversarial label.
``epochs`` counts passes over the reserved set (the reference's 100 rounds), batch 256; the last
model is kept.

Deviations: x + δ is clipped to the valid pixel range [0, 1] (the reference computes the bounds
but never applies them), so δ is the perturbation actually applied; the reference stops PGD early
once every sample is shared, here all steps run, which changes nothing (with every sample shared
both losses have no term left and the gradient, hence the step, is zero); fp32; the last partial
batch is padded and masked out of every sum (B counts the real samples).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from d3jax.data.augment import augment
from d3jax.defenses.checks import check_fields
from d3jax.optim.reference import keep_reference
from d3jax.engine.train import Batch, Hyperparams, Program, TrainState, cross_entropy, join_variables
from d3jax.engine.train import Precision

PyTree = Any


def js_divergence(p: jax.Array, q: jax.Array) -> jax.Array:
  """Per-row Jensen–Shannon divergence of two probability vectors, each clipped to ≥ 1e-8."""
  p, q = jnp.maximum(p, 1e-8), jnp.maximum(q, 1e-8)
  m = 0.5 * (p + q)
  return 0.5 * jnp.sum(p * (jnp.log(p) - jnp.log(m)), -1) + 0.5 * jnp.sum(q * (jnp.log(q) - jnp.log(m)), -1)


def _masked_sum_mean(values: jax.Array, where: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ over the valid samples in ``where`` of ``values``, divided by the number of valid samples."""
  return jnp.sum(jnp.where(where & mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def pgd_loss(logits: jax.Array, ref_logits: jax.Array, clean_pred: jax.Array,
             ref_clean_pred: jax.Array, labels: jax.Array, mask: jax.Array, adv_weight: Any,
             share_weight: Any) -> jax.Array:
  """The shared-PGD objective adv_weight·L_adv + share_weight·L_share at x' (minimised in δ)."""
  pred, ref_pred = logits.argmax(-1), ref_logits.argmax(-1)
  fooled, ref_fooled = pred != clean_pred, ref_pred != ref_clean_pred
  shared = fooled & ref_fooled & (pred == ref_pred)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  ref_ce = optax.softmax_cross_entropy_with_integer_labels(ref_logits, labels)
  adv = -(_masked_sum_mean(ce, ~fooled, mask) + _masked_sum_mean(ref_ce, ~ref_fooled, mask)) / 2
  js = js_divergence(jax.nn.softmax(logits), jax.nn.softmax(ref_logits))
  return adv_weight * adv + share_weight * _masked_sum_mean(js, ~shared, mask)


def shared_loss(adv_logits: jax.Array, ref_adv_pred: jax.Array, ref_clean_pred: jax.Array,
                labels: jax.Array, mask: jax.Array) -> jax.Array:
  """SAU's unlearning term: on samples where f_ref(x') = c is wrong (c ≠ y, c ≠ f_ref(x)),
  (1/2B)·Σ[−log(1e-6 + min(Σ_{j≠c} p_j, 0.999)) − log(1 + 1e-6 − max(p_c, 0.001))]."""
  probs = jax.nn.softmax(adv_logits)
  onehot = jax.nn.one_hot(ref_adv_pred, probs.shape[-1])
  pos = jnp.maximum(jnp.sum(probs * onehot, -1), 0.001)
  neg = jnp.minimum(jnp.sum(probs * (1.0 - onehot), -1), 0.999)
  per_sample = -jnp.log(1e-6 + neg) - jnp.log(1.0 + 1e-6 - pos)
  potential = (ref_adv_pred != labels) & (ref_adv_pred != ref_clean_pred)
  return _masked_sum_mean(per_sample, potential, mask) / 2


def shared_pgd(logits_of, params: PyTree, reference: PyTree, x: jax.Array, labels: jax.Array,
               mask: jax.Array, hparams: Hyperparams, steps: int,
               ref_clean_pred: jax.Array | None = None) -> jax.Array:
  """δ for images ``x`` in [0, 1]: ``steps`` signed descent steps on :func:`pgd_loss` from +ε,
  kept in the L∞ ball of radius ε and with x + δ in [0, 1]. ``logits_of(params, x)`` maps [0, 1]
  images to logits; ``ref_clean_pred`` is the reference's prediction on x (computed if None)."""
  eps = hparams["eps"]
  clean_pred = logits_of(params, x).argmax(-1)
  if ref_clean_pred is None:
    ref_clean_pred = logits_of(reference, x).argmax(-1)

  def objective(delta):
    return pgd_loss(logits_of(params, x + delta), logits_of(reference, x + delta), clean_pred,
                    ref_clean_pred, labels, mask, hparams["pgd_adv_weight"], hparams["pgd_share_weight"])

  def project(delta):
    return jnp.clip(x + jnp.clip(delta, -eps, eps), 0.0, 1.0) - x

  def one(_, delta):
    return project(delta - hparams["pgd_lr"] * jnp.sign(jax.grad(objective)(delta)))

  return jax.lax.fori_loop(0, steps, one, project(jnp.full_like(x, eps)))


@dataclasses.dataclass(frozen=True, eq=False)
class SAUProgram(Program):
  """A program whose step is one SAU step: shared PGD, then the unlearning update."""

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    recipe, hparams = self.recipe, state.hparams
    x = augment(batch.image, self.step_key(state), crop_padding=recipe.crop_padding,
                flip=recipe.flip).astype(jnp.float32) / 255.0
    reference = state.opt_state[-1].reference
    mean, std = jnp.asarray(self.normalization.mean), jnp.asarray(self.normalization.std)

    def logits_of(params, images):
      variables = join_variables(params, state.batch_stats)
      return self.model.apply(variables, (images - mean) / std, train=False)

    ref_clean_pred = logits_of(reference, x).argmax(-1)
    delta = jax.lax.stop_gradient(shared_pgd(logits_of, state.params, reference, x, batch.label,
                                             batch.mask, hparams, recipe.pgd_steps, ref_clean_pred))
    ref_adv_pred = logits_of(reference, x + delta).argmax(-1)

    def objective(params):
      both = logits_of(params, jnp.concatenate([x, x + delta]))
      clean, adv = both[:x.shape[0]], both[x.shape[0]:]
      return (hparams["clean_weight"] * cross_entropy(clean, batch.label, batch.mask, hparams)
              + hparams["adv_weight"] * cross_entropy(adv, batch.label, batch.mask, hparams)
              + hparams["shared_weight"] * shared_loss(adv, ref_adv_pred, ref_clean_pred,
                                                       batch.label, batch.mask))

    loss, grads = jax.value_and_grad(objective)(state.params)
    return self.apply_gradients(state, grads, state.batch_stats), {"loss": loss}


@dataclasses.dataclass(frozen=True)
class SAUConfig:
  """SAU settings (BackdoorBench's names in brackets): ``eps`` [trigger_norm], ``pgd_lr``
  [adv_lr], ``pgd_steps`` [adv_steps], ``pgd_adv_weight`` [beta_1], ``pgd_share_weight``
  [beta_2], ``clean_weight`` [lmd_1], ``adv_weight`` [lmd_2], ``shared_weight`` [lmd_3],
  ``epochs`` [n_rounds]. Every float setting is sweepable."""
  eps: float = 0.2
  pgd_lr: float = 0.2
  pgd_steps: int = 5
  pgd_adv_weight: float = 0.01
  pgd_share_weight: float = 1.0
  clean_weight: float = 1.0
  adv_weight: float = 0.0
  shared_weight: float = 1.0
  learning_rate: float = 1e-4
  epochs: int = 100
  batch_size: int = 256
  crop_padding: int = 0
  flip: bool = False
  train_mode: bool = False
  precision: Precision = "f32"  # products in f32, or bf16 with f32 accumulation
  program_class = SAUProgram  # not a field: the program this recipe runs in

  def __post_init__(self) -> None:
    check_fields(self, counts=("pgd_steps",), unit=("eps",),
                 nonnegative=("pgd_lr", "pgd_adv_weight", "pgd_share_weight", "clean_weight",
                              "adv_weight", "shared_weight", "learning_rate"))
    if self.train_mode:
      raise ValueError("train_mode must be False: SAU keeps the model in eval mode.")

  def hyperparams(self) -> dict[str, jax.Array]:
    return {name: jnp.float32(getattr(self, name))
            for name in ("eps", "pgd_lr", "pgd_adv_weight", "pgd_share_weight", "clean_weight",
                         "adv_weight", "shared_weight", "learning_rate")}

  def loss(self, logits: jax.Array, labels: jax.Array, mask: jax.Array, hparams: Hyperparams
           ) -> jax.Array:
    """Plain cross-entropy (SAU's loss lives in :meth:`SAUProgram.step`)."""
    return cross_entropy(logits, labels, mask, hparams)

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    del steps_per_epoch
    return optax.chain(optax.amsgrad(hparams["learning_rate"]), keep_reference())

  def warm_start(self, params: PyTree, key: jax.Array) -> PyTree:
    del key
    return params
