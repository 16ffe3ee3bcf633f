"""NAD — Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural attention
distillation: erasing backdoor triggers from deep neural networks", ICLR 2021, method section:
the attention operator A^p_sum and the NAD loss), as BackdoorBench's ``defense/nad.py`` runs it.

1. Teacher: the backdoored model fine-tuned on the reserved set with FT's recipe (SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, cosine with T_max = 100 per epoch, batch 256, BN in train
   mode) for ``teacher_epochs`` = 10 epochs.
2. Student: the backdoored model trained for ``epochs`` = 10 on CE + Σ_k β_k·AT(F_s^k, F_t^k)
   with SGD at a constant lr 0.01 (momentum 0.9, weight decay 5e-4), BN in train mode for the
   student and eval mode for the teacher; the last model is kept. The attention map of a feature
   map F (H×W×C) is A(F) = Σ_c |F_c|^p (p = 2) flattened over H·W and divided by its L2 norm
   (+1e-6); AT is the mean squared difference of the two maps (the paper's L2 distance of the
   normalised maps, squared and averaged as in the reference), averaged over the batch.

Layers: by default those the model declares in its ``attention_layers`` class attribute (the
defense asks the model, it imports no model). PreAct-ResNet18 declares the outputs of stages 3 and
4 (``layer3_1``, ``layer4_1``), distilled with β = 500 and 1000, BackdoorBench's choice for that
model. The small CNN (not in BackdoorBench) declares the outputs of the last BN of its two stages
(``bn2``, ``bn4``, before the ReLU). Other models need ``layers``; the paper's own WRN uses the
outputs of its three groups with β = 500, 1000, 1000.

Deviations: BackdoorBench adds a third term, β = 1000 on the 1×1 map of the pooled features,
which is ≈0 whatever the weights (a one-pixel map normalises to 1); it is left out. The sum over
channels is as in the reference (a mean differs only by the constant C, which the normalisation
removes, up to the 1e-6). The norm is computed safely (no NaN gradient on an all-zero map).
fp32 instead of mixed precision. The last partial batch is padded and masked, as everywhere in
d3jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.data.augment import augment, normalize
from d3jax.defenses.checks import check_fields
from d3jax.defenses.features import apply_recording
from d3jax.defenses.ft import FTConfig
from d3jax.reductions import masked_mean
from d3jax.engine.train import (Batch, EpochCallback, Hyperparams, Normalization, Program, Restore,
                         SGDConfig, TrainState, cross_entropy, fit, init_state, join_variables,
                         sgd_with_weight_decay, train)

PyTree = Any


def attention_map(features: jax.Array, power: jax.Array | float) -> jax.Array:
  """A(F) = Σ_c |F_c|^p per position (NAD's A^p_sum), flattened to (N, H·W) and divided by its
  L2 norm + 1e-6. ``features`` is (N, H, W, C), or (N, C) for a 1×1 map."""
  energy = jnp.sum(jnp.abs(features) ** power, axis=-1).reshape(features.shape[0], -1)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(energy * energy, axis=-1, keepdims=True), 1e-24))
  return energy / (norm + 1e-6)


def attention_loss(student: Sequence[jax.Array], teacher: Sequence[jax.Array], betas: jax.Array,
                   power: jax.Array | float, mask: jax.Array) -> jax.Array:
  """Σ_k β_k·AT_k with AT_k the mean over positions of (A(F_s^k) − A(F_t^k))², averaged over the
  valid samples (the NAD loss); the teacher's maps carry no gradient."""
  total = jnp.zeros((), jnp.float32)
  for k, (fs, ft) in enumerate(zip(student, teacher)):
    target = jax.lax.stop_gradient(attention_map(ft, power))
    per_sample = jnp.mean(jnp.square(attention_map(fs, power) - target), axis=-1)
    total = total + betas[k] * masked_mean(per_sample, mask)
  return total


def default_layers(model: nn.Module) -> tuple[str, ...]:
  """The module paths the model declares for attention distillation (its ``attention_layers``
  class attribute; see the module docstring)."""
  layers = tuple(getattr(model, "attention_layers", ()))
  if not layers:
    raise ValueError(f"NAD has no default layers for {type(model).__name__} (it declares no "
                     "attention_layers); set layers to the module paths whose outputs to distil, "
                     "one beta each.")
  return layers


@flax.struct.dataclass
class DistillState(TrainState):
  """The engine's state plus the teacher's variables (read in eval mode, never updated)."""
  teacher: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class NADProgram(Program):
  """The student's program: CE plus attention distillation from the state's teacher."""

  def init(self, variables: PyTree, n: int, key: jax.Array, hparams: Hyperparams | None = None
           ) -> DistillState:
    """As :meth:`Program.init`, with the starting variables as the teacher (replace it)."""
    state = super().init(variables, n, key, hparams)
    fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(TrainState)}
    return DistillState(**fields, teacher=join_variables(state.params, state.batch_stats))

  def layers(self) -> tuple[str, ...]:
    return self.recipe.layers or default_layers(self.model)

  def step(self, state: DistillState, batch: Batch) -> tuple[DistillState, dict[str, jax.Array]]:
    recipe, hparams, layers = self.recipe, state.hparams, self.layers()
    augment_key, dropout_key = jax.random.split(self.step_key(state))
    x = augment(batch.image, augment_key, crop_padding=recipe.crop_padding, flip=recipe.flip)
    x = normalize(x, self.normalization.mean, self.normalization.std)
    _, teacher = apply_recording(self.model, state.teacher, x, layers, train=False)

    def objective(params):
      (logits, updated), student = apply_recording(
          self.model, join_variables(params, state.batch_stats), x, layers,
          train=recipe.train_mode, mutable=["batch_stats"], rngs={"dropout": dropout_key})
      loss = cross_entropy(logits, batch.label, batch.mask, hparams) + attention_loss(
          student, teacher, hparams["betas"], hparams["power"], batch.mask)
      return loss, updated

    (loss, updated), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    state = self.apply_gradients(state, grads, updated.get("batch_stats", state.batch_stats))
    return state, {"loss": loss}


@dataclasses.dataclass(frozen=True)
class NADConfig(SGDConfig):
  """NAD settings: the teacher's fine-tuning (``teacher_epochs`` and FT's recipe from the shared
  fields) and the student's distillation (``epochs``, ``betas`` for ``layers``, ``power``; an
  empty ``layers`` means the model's default). NAD runs in stages, so it is not sweepable as one
  program; ``learning_rate``, ``weight_decay``, ``betas`` and ``power`` are arrays in the
  student's state."""
  epochs: int = 10
  teacher_epochs: int = 10
  betas: tuple[float, ...] = (500.0, 1000.0)
  layers: tuple[str, ...] = ()
  power: float = 2.0

  def __post_init__(self) -> None:
    object.__setattr__(self, "betas", tuple(self.betas))
    object.__setattr__(self, "layers", tuple(self.layers))
    super().__post_init__()
    check_fields(self, counts=("teacher_epochs",), positive=("power",))
    if not self.betas or not all(beta >= 0 for beta in self.betas):
      raise ValueError(f"betas must be a non-empty tuple of numbers ≥ 0, got {self.betas!r}.")
    if not all(isinstance(layer, str) and layer for layer in self.layers):
      raise ValueError(f"layers must be module paths such as 'layer4_1', got {self.layers!r}.")
    if self.layers and len(self.layers) != len(self.betas):
      raise ValueError(f"layers must have one entry per beta ({len(self.betas)}), got {self.layers!r}.")

  def hyperparams(self) -> dict[str, jax.Array]:
    return {**super().hyperparams(), "betas": jnp.asarray(self.betas, jnp.float32),
            "power": jnp.float32(self.power)}

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: jax.Array) -> optax.GradientTransformation:
    """The student's SGD at a constant rate (the reference never steps its scheduler)."""
    del steps_per_epoch
    return sgd_with_weight_decay(hparams["learning_rate"], hparams["weight_decay"], self.momentum)

  def teacher(self) -> FTConfig:
    """FT's recipe with this config's shared settings, for ``teacher_epochs``."""
    shared = {field.name: getattr(self, field.name) for field in dataclasses.fields(SGDConfig)}
    return FTConfig(**{**shared, "epochs": self.teacher_epochs})

  def defend(self, model: nn.Module, variables: PyTree, images: np.ndarray, labels: np.ndarray, *,
             normalization: Normalization, key: jax.Array, progress: bool = True,
             callback: EpochCallback | None = None, restore: Restore | None = None
             ) -> tuple[PyTree, dict[str, Any]]:
    """Fine-tune the teacher, then distil its attention into the backdoored model."""
    program = NADProgram(model, self, normalization)
    layers = program.layers()
    if len(layers) != len(self.betas):
      raise ValueError(f"betas must have one entry per distilled layer {layers}, got {self.betas!r}.")
    teacher_key, student_key = jax.random.split(key)
    teacher, teacher_history = train(Program(model, self.teacher(), normalization), variables,
                                     images, labels, teacher_key, desc="nad teacher",
                                     progress=progress)
    state = init_state(program, variables, len(labels), student_key).replace(teacher=teacher)
    if restore is not None:
      state = restore(state)
    state, history = fit(program, state, images, labels, desc="nad", progress=progress,
                         callback=callback)
    return state.variables, {"teacher_losses": teacher_history["loss"].tolist(),
                             "layers": list(layers), "losses": history.get("loss", np.zeros(0)).tolist()}
