"""Input-aware dynamic backdoor attack: Nguyen & Tran, "Input-aware dynamic backdoor attack",
NeurIPS 2020.

A training-controlled attack whose trigger depends on the input: a pattern generator G and a
mask generator M (small encoder-decoder conv nets) give every image x its own trigger,
poisoned = x + m(x)⊙(g(x) − x) in normalized space. Training has two stages (Sec. 3):

1. M alone learns masks that are sparse (density loss, relu(m − density)) and diverse (the
   diversity loss ‖x − x'‖ / ‖m(x) − m(x')‖ with a second image x'), then is frozen;
2. G and the classifier train jointly: per batch a share ``ratio`` of backdoor samples (own
   trigger, target label), a share ``cross_ratio`` of cross samples (ANOTHER image's trigger,
   label kept: the "cross-trigger" mode that makes a trigger useless on other inputs) and the
   rest clean, with cross-entropy plus λ_div times the diversity loss on G's patterns.

The first stage runs in :meth:`InputAwareProgram.begin`, before the engine's epochs; both
stages are jitted ``lax.scan`` epochs, and G, M and their Adam states live in the training state.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.attacks.training import AttackTrainConfig, BatchPoisonTraining
from d3jax.attacks.triggers import ImageShape, _check_batch, _image_shape
from d3jax.data.augment import augment, normalize
from d3jax.models.conv import LOWERINGS, Conv, max_pool_2x2
from d3jax.progress import progress_bar
from d3jax.reductions import masked_mean
from d3jax.engine.train import (Batch, Hyperparams, Normalization, Program, PyTree, TrainState,
                         batch_plan, cross_entropy, join_variables, split_variables)

LOG = logging.getLogger("d3jax")  # a run directory's log.txt records stage 1 too
_EPSILON = 1e-7
_MASK_STREAM, _GENERATOR_STREAM, _INIT_STREAM, _MASK_PLAN_STREAM = 5, 6, 7, 8


class Generator(nn.Module):
  """The encoder-decoder of both generators: ``depth`` scales of two 3×3 conv-BN-ReLU blocks and
  a 2×2 max pool (``width``·2^i channels), a middle block, then per scale a bilinear ×2 upsample
  and two blocks, the last to ``channels`` outputs without ReLU; output tanh(tanh(·))/2 + ½, as
  the authors' code does (values in about (0.12, 0.88))."""
  channels: int
  width: int = 32
  depth: int = 3
  conv: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def block(x, features, relu=True):
      x = Conv(features, (3, 3), padding=((1, 1), (1, 1)), lowering=self.conv)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.95, epsilon=1e-5)(x)
      return nn.relu(x) if relu else x

    features = [self.width * 2 ** i for i in range(self.depth)]
    sizes = []
    for f in features:
      sizes.append(x.shape[1:3])
      x = max_pool_2x2(block(block(x, f), f))
    x = block(x, features[-1])
    for i in reversed(range(self.depth)):
      x = jax.image.resize(x, (x.shape[0], *sizes[i], x.shape[-1]), "bilinear")
      last = i == 0
      x = block(block(x, features[i]), self.channels if last else features[i - 1], relu=not last)
    return jnp.tanh(jnp.tanh(x)) / (2 + _EPSILON) + 0.5


def threshold(mask: jax.Array) -> jax.Array:
  """The mask generator's soft threshold: tanh(20·m − 10)/2 + ½."""
  return jnp.tanh(20.0 * mask - 10.0) / (2 + _EPSILON) + 0.5


def pair_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-sample root mean square difference of two batches, (N,)."""
  return jnp.sqrt(jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim))))


def diversity_loss(images: jax.Array, others: jax.Array, outputs: jax.Array,
                   other_outputs: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """The paper's diversity loss: mean over pairs of ‖x − x'‖ / (‖g(x) − g(x')‖ + 1e-7), with
  root-mean-square distances (over ``valid`` pairs when given)."""
  ratio = pair_distance(images, others) / (pair_distance(outputs, other_outputs) + _EPSILON)
  return jnp.mean(ratio) if valid is None else masked_mean(ratio, valid)


def blend(images: jax.Array, patterns: jax.Array, masks: jax.Array) -> jax.Array:
  """x + m⊙(p − x): every image with its pattern where its mask is on."""
  return images + masks * (patterns - images)


def step_decay(base: jax.Array, epoch: jax.Array, at: tuple[int, ...], gamma: jax.Array
               ) -> jax.Array:
  """PyTorch ``MultiStepLR`` stepped per epoch: base·γ^(milestones in ``at`` passed)."""
  passed = sum((epoch >= m).astype(jnp.float32) for m in at) if at else 0.0
  return base * gamma ** passed


def milestones(text: str, field: str = "milestones") -> tuple[int, ...]:
  """Comma-separated epochs ≥ 1 ("" for none) as a tuple; ValueError naming ``field`` else."""
  try:
    epochs = tuple(int(part) for part in text.split(",")) if text.strip() else ()
  except (AttributeError, ValueError):
    epochs = (0,)
  if any(epoch < 1 for epoch in epochs):
    raise ValueError(f"input_aware {field} must be comma-separated epochs ≥ 1, got {text!r}.")
  return epochs


def adam_step(params: PyTree, grads: PyTree, opt_state: PyTree, learning_rate: jax.Array
              ) -> tuple[PyTree, PyTree]:
  """One Adam step with β = (0.5, 0.9), the authors' setting for both generators."""
  updates, opt_state = _ADAM.update(grads, opt_state, params)
  return jax.tree.map(lambda p, u: p - learning_rate * u, params, updates), opt_state


_ADAM = optax.scale_by_adam(b1=0.5, b2=0.9)


@dataclasses.dataclass(frozen=True)
class InputAwareConfig:
  """The input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020) with the published defaults
  (the authors' code, as BackdoorBench runs it): generators of width 32 at 3 scales, 25 epochs of
  mask pre-training, cross ratio 0.1, λ_div 1, λ_norm 100, mask density 0.032, Adam (0.01,
  β (0.5, 0.9)) for both generators with step decay ×0.1 at epochs 200, 300, 400, 500 (pattern)
  and 10, 20 (mask). The backdoor ratio p_a is the run's ``ratio`` (0.1).

  Deviations: (1) the authors' joint-training loop zeroes only the classifier's gradients, so
  the pattern generator's Adam receives the running SUM of all gradients since training began;
  here every step uses that step's gradient (the evident intent; BackdoorBench keeps the bug).
  (2) The second image x' of each pair is the image half a batch away in the same shuffled batch,
  not one from a second, independently shuffled loader. (3) The classifier trains with the run's
  recipe (BackdoorBench's cosine schedule) instead of the authors' step decay at epoch 100, and
  the engine's per-sample crop/flip. (4) G runs once over the backdoor and cross sources
  together (one batch-norm update per step instead of two). (5) Mask pre-training weights its
  diversity loss by λ_div once (the authors' code multiplies it in twice; equal at the default 1).

  Attributes:
    width: channels of the generators' first scale (doubling per scale).
    depth: scales of the generators (image sides are halved ``depth`` times).
    mask_epochs: epochs of mask-generator pre-training (stage 1).
    cross_ratio: share of every batch that gets another image's trigger (p_c).
    lambda_div: weight of the diversity losses.
    lambda_norm: weight of the mask density loss.
    mask_density: the mask density below which the density loss is zero.
    generator_lr: Adam learning rate of the pattern generator.
    mask_lr: Adam learning rate of the mask generator.
    generator_milestones: comma-separated epochs at which the pattern generator's rate is
      multiplied by ``gamma`` (empty: never).
    mask_milestones: the same for the mask generator, in mask pre-training epochs.
    gamma: the step-decay factor.
    conv: the generators' convolution lowering, "auto" | "lax" | "im2col" | "winograd" (as the models').
      "auto" (im2col on the CPU): a single jitted generator pass is faster with "lax" there,
      but inside the ``lax.scan`` epochs the attack trains in, "lax" is about 38× slower
      (``benchmarks/generator_lowering.py``).
  """

  width: int = 32
  depth: int = 3
  mask_epochs: int = 25
  cross_ratio: float = 0.1
  lambda_div: float = 1.0
  lambda_norm: float = 100.0
  mask_density: float = 0.032
  generator_lr: float = 0.01
  mask_lr: float = 0.01
  generator_milestones: str = "200,300,400,500"
  mask_milestones: str = "10,20"
  gamma: float = 0.1
  conv: str = "auto"
  name: ClassVar[str] = "input_aware"
  label_modes: ClassVar[tuple[str, ...]] = ("all2one", "all2all")
  kind: ClassVar[str] = "training"
  crafts_on: ClassVar[str] = "nothing"
  trains_on: ClassVar[str] = "clean"
  trained_trigger: ClassVar[bool] = True

  def __post_init__(self) -> None:
    for field in ("width", "depth"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"input_aware {field} must be an integer ≥ 1, got {value!r}.")
    if isinstance(self.mask_epochs, bool) or not isinstance(self.mask_epochs, int) \
        or self.mask_epochs < 0:
      raise ValueError(f"input_aware mask_epochs must be an integer ≥ 0, got {self.mask_epochs!r}.")
    if not 0 <= self.cross_ratio < 1:
      raise ValueError(f"input_aware cross_ratio must be in [0, 1), got {self.cross_ratio!r}.")
    for field in ("lambda_div", "lambda_norm", "generator_lr", "mask_lr"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"input_aware {field} must be ≥ 0, got {getattr(self, field)!r}.")
    if not 0 <= self.mask_density <= 1:
      raise ValueError(f"input_aware mask_density must be in [0, 1], got {self.mask_density!r}.")
    if not 0 < self.gamma <= 1:
      raise ValueError(f"input_aware gamma must be in (0, 1], got {self.gamma!r}.")
    if self.conv not in LOWERINGS:
      raise ValueError(f"input_aware conv must be one of {', '.join(LOWERINGS)}, got {self.conv!r}.")
    for field in ("generator_milestones", "mask_milestones"):
      value = getattr(self, field)
      if isinstance(value, int) and not isinstance(value, bool):  # one epoch, as a flag parses it
        object.__setattr__(self, field, str(value))
      milestones(getattr(self, field), field)

  def generators(self, channels: int) -> tuple[Generator, Generator]:
    """(pattern generator G, mask generator M) for images of ``channels`` channels."""
    return (Generator(channels, self.width, self.depth, self.conv),
            Generator(1, self.width, self.depth, self.conv))

  def variables_like(self, channels: int) -> PyTree:
    """Shapes and dtypes of both generators' variables (``{"pattern", "mask"}``), for restoring
    a saved trigger."""
    pattern_net, mask_net = self.generators(channels)
    probe = jnp.zeros((1, 8, 8, channels), jnp.float32)
    key = jax.random.key(0)
    return jax.eval_shape(lambda: {"pattern": dict(pattern_net.init(key, probe)),
                                   "mask": dict(mask_net.init(key, probe))})

  def trained(self, image_shape: ImageShape, normalization: Normalization,
              variables: PyTree) -> "Generated":
    """The trigger of trained generator ``variables`` (``{"pattern", "mask"}``)."""
    return Generated(_image_shape(image_shape), variables, normalization, self)

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> Any:
    """Refuses: the trigger is trained with the model (:meth:`InputAwareProgram.trigger`)."""
    raise ValueError("the input_aware trigger is trained together with the model; train its "
                     "program and take InputAwareProgram.trigger(state, image_shape).")

  def program(self, model: nn.Module, recipe: AttackTrainConfig, normalization: Normalization, *,
              ratio: float, target: int, label_mode: str, num_classes: int) -> "InputAwareProgram":
    """The program that trains ``model`` and both generators with ``recipe`` on the clean
    training set, backdooring a ``ratio`` share of every batch toward ``target``."""
    training = InputAwareTraining(**dataclasses.asdict(recipe), attack=self, ratio=ratio,
                                  target=target, label_mode=label_mode, num_classes=num_classes)
    return InputAwareProgram(model, training, normalization)


@dataclasses.dataclass(frozen=True)
class InputAwareTraining(BatchPoisonTraining):
  """The classifier's recipe plus the attack's; the attack's numbers are hyperparameters (arrays
  in the state), the sample counts per batch are static.

  Attributes:
    attack: the input-aware config; ``ratio`` (p_a) and the rest as
      :class:`d3jax.attacks.training.BatchPoisonTraining`.
  """
  attack: InputAwareConfig = InputAwareConfig()
  title: ClassVar[str] = "input_aware"

  def __post_init__(self) -> None:
    super().__post_init__()
    backdoor, cross = self.counts
    if backdoor + cross > self.batch_size // 2:
      raise ValueError(
          f"input_aware ratio {self.ratio} and cross_ratio {self.attack.cross_ratio} give "
          f"{backdoor + cross} triggered samples per batch of {self.batch_size}, more than half "
          "the batch; lower them or raise batch_size.")

  @property
  def counts(self) -> tuple[int, int]:
    """(backdoor, cross) samples per batch."""
    return int(self.ratio * self.batch_size), int(self.attack.cross_ratio * self.batch_size)

  def hyperparams(self) -> dict[str, jax.Array]:
    attack = self.attack
    return {**super().hyperparams(), **{
        name: jnp.float32(getattr(attack, name)) for name in (
            "lambda_div", "lambda_norm", "mask_density", "generator_lr", "mask_lr", "gamma")}}


@flax.struct.dataclass
class InputAwareState(TrainState):
  """The engine's state plus both generators' variables and Adam states."""
  generator: PyTree
  generator_opt: PyTree
  mask: PyTree
  mask_opt: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class InputAwareProgram(Program):
  """A :class:`d3jax.engine.train.Program` that trains the classifier with the pattern generator, after
  :meth:`begin` pre-trains the mask generator. Train it on the CLEAN training set with
  :func:`d3jax.engine.train.train`; the backdoor test set comes from :meth:`trigger` of the final state.
  """
  recipe: InputAwareTraining

  @property
  def _generators(self) -> tuple[Generator, Generator]:
    return self.recipe.attack.generators(len(self.normalization.mean))

  def init(self, variables: PyTree, n: int, key: jax.Array, hparams: Hyperparams | None = None
           ) -> InputAwareState:
    base = super().init(variables, n, key, hparams)
    pattern_net, mask_net = self._generators
    probe = jnp.zeros((1, 8, 8, len(self.normalization.mean)), jnp.float32)
    g_key, m_key = jax.random.split(jax.random.fold_in(key, _INIT_STREAM))
    generator = dict(pattern_net.init(g_key, probe))
    mask = dict(mask_net.init(m_key, probe))
    return InputAwareState(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, generator=generator,
                           generator_opt=_ADAM.init(generator["params"]), mask=mask,
                           mask_opt=_ADAM.init(mask["params"]))

  def _normalized(self, images: jax.Array, key: jax.Array) -> jax.Array:
    x = augment(images, key, crop_padding=self.recipe.crop_padding, flip=self.recipe.flip)
    return normalize(x, self.normalization.mean, self.normalization.std)

  def _pattern(self, patterns: jax.Array) -> jax.Array:
    """G's [0, 1] output in normalized space."""
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.normalization.mean, self.normalization.std))
    return (patterns - mean) / std

  def mask_step(self, state: InputAwareState, batch: Batch, epoch: jax.Array, index: jax.Array
                ) -> tuple[InputAwareState, jax.Array]:
    """Step ``index`` of mask pre-training epoch ``epoch``: density plus diversity loss, Adam
    on M."""
    hp = state.hparams
    key = jax.random.fold_in(jax.random.fold_in(state.key, _MASK_STREAM), epoch)
    x = self._normalized(batch.image, jax.random.fold_in(key, index))
    half = x.shape[0] // 2
    _, mask_net = self._generators
    params, stats = split_variables(state.mask)

    def objective(params):
      raw, updated = mask_net.apply(join_variables(params, stats), x, train=True,
                                    mutable=["batch_stats"])
      masks = threshold(raw)
      valid = batch.mask & jnp.roll(batch.mask, half)
      density = masked_mean(jnp.mean(nn.relu(masks - hp["mask_density"]), axis=(1, 2, 3)), batch.mask)
      diversity = diversity_loss(x, jnp.roll(x, half, 0), masks, jnp.roll(masks, half, 0), valid)
      return hp["lambda_norm"] * density + hp["lambda_div"] * diversity, updated

    (loss, updated), grads = jax.value_and_grad(objective, has_aux=True)(params)
    lr = step_decay(hp["mask_lr"], epoch, milestones(self.recipe.attack.mask_milestones),
                    hp["gamma"])
    params, opt = adam_step(params, grads, state.mask_opt, lr)
    mask = join_variables(params, updated.get("batch_stats", stats))
    return state.replace(mask=mask, mask_opt=opt), loss

  def begin(self, state: InputAwareState, images: jax.Array, labels: jax.Array, *,
            progress: bool = False) -> InputAwareState:
    """Stage 1: ``mask_epochs`` jitted epochs of mask-generator pre-training."""
    epochs = self.recipe.attack.mask_epochs
    for epoch in progress_bar(range(epochs), desc="input_aware masks", disable=not progress):
      state, loss = _mask_epoch(self, state, images, labels, jnp.int32(epoch))
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f"input_aware mask pre-training loss became {float(loss)} in "
                                 f"epoch {epoch + 1}; lower mask_lr.")
      LOG.info("input_aware mask pre-training epoch %d/%d  loss %.4f", epoch + 1, epochs, float(loss))
    return state

  def step(self, state: InputAwareState, batch: Batch) -> tuple[InputAwareState, dict[str, jax.Array]]:
    """One joint step of the classifier and the pattern generator (M frozen, eval mode)."""
    recipe, hp = self.recipe, state.hparams
    key = jax.random.fold_in(jax.random.fold_in(state.key, _GENERATOR_STREAM), state.step)
    augment_key, dropout_key = jax.random.split(key)
    x = self._normalized(batch.image, augment_key)
    backdoor, cross = recipe.counts
    sources = source_rows(x.shape[0], backdoor, cross)
    pattern_net, mask_net = self._generators
    masks = threshold(mask_net.apply(state.mask, x[sources], train=False))
    g_params, g_stats = split_variables(state.generator)

    def objective(both):
      c_params, g_params = both
      raw, g_updated = pattern_net.apply(join_variables(g_params, g_stats), x[sources], train=True,
                                         mutable=["batch_stats"])
      patterns = self._pattern(raw)
      inputs, labels = poison_rows(x, batch.label, patterns, masks, recipe)
      logits, c_updated = self.model.apply(
          join_variables(c_params, state.batch_stats), inputs, train=recipe.train_mode,
          mutable=["batch_stats"], rngs={"dropout": dropout_key})
      ce = cross_entropy(logits, labels, batch.mask, hp)
      pairs = min(backdoor, cross)
      diversity = diversity_loss(x[:pairs], x[sources[backdoor:backdoor + pairs]],
                                 patterns[:pairs], patterns[backdoor:backdoor + pairs]) \
          if pairs else jnp.float32(0.0)
      return ce + hp["lambda_div"] * diversity, (c_updated, g_updated, ce, diversity)

    (loss, (c_updated, g_updated, ce, diversity)), (c_grads, g_grads) = jax.value_and_grad(
        objective, has_aux=True)((state.params, g_params))
    tx = recipe.optimizer(hp, state.steps_per_epoch)
    updates, opt_state = tx.update(c_grads, state.opt_state, state.params)
    epoch = state.step // state.steps_per_epoch
    lr = step_decay(hp["generator_lr"], epoch, milestones(recipe.attack.generator_milestones),
                    hp["gamma"])
    g_params, g_opt = adam_step(g_params, g_grads, state.generator_opt, lr)
    state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=c_updated.get("batch_stats", state.batch_stats), opt_state=opt_state,
        generator=join_variables(g_params, g_updated.get("batch_stats", g_stats)),
        generator_opt=g_opt)
    return state, {"loss": loss, "cross_entropy": ce, "diversity": diversity}

  def trigger(self, state: InputAwareState, image_shape: ImageShape) -> "Generated":
    """The trained trigger of ``state`` as a uint8 pixel-space trigger."""
    return self.recipe.attack.trained(image_shape, self.normalization, generated_variables(state))


def source_rows(batch_size: int, backdoor: int, cross: int) -> jax.Array:
  """Rows whose patterns a batch needs: the ``backdoor`` first rows (their own triggers) and,
  for the ``cross`` rows after them, the rows half a batch away (another image's trigger)."""
  half = batch_size // 2
  return jnp.concatenate([jnp.arange(backdoor),
                          (jnp.arange(backdoor, backdoor + cross) + half) % batch_size])


def poison_rows(x: jax.Array, labels: jax.Array, patterns: jax.Array, masks: jax.Array,
                recipe: InputAwareTraining) -> tuple[jax.Array, jax.Array]:
  """The training batch: backdoor rows with their own pattern and the target label, cross rows
  with the patterns and masks of ``source_rows`` (labels kept), the rest clean."""
  backdoor, cross = recipe.counts
  triggered = blend(x[:backdoor + cross], patterns, masks)
  inputs = jnp.concatenate([triggered, x[backdoor + cross:]])
  return inputs, jnp.concatenate([recipe.backdoor_labels(labels[:backdoor]), labels[backdoor:]])


@functools.partial(jax.jit, static_argnums=0)
def _mask_epoch(program: InputAwareProgram, state: InputAwareState, images: jax.Array,
                labels: jax.Array, epoch: jax.Array) -> tuple[InputAwareState, jax.Array]:
  key = jax.random.fold_in(jax.random.fold_in(state.key, _MASK_PLAN_STREAM), epoch)
  indices, valid = batch_plan(key, images.shape[0], program.recipe.batch_size)

  def one(state, plan):
    step, index, mask = plan
    return program.mask_step(state, Batch(images[index], labels[index], mask), epoch, step)

  steps = jnp.arange(indices.shape[0])
  state, losses = jax.lax.scan(one, state, (steps, indices, valid))
  return state, jnp.mean(losses)


def generated_variables(state: InputAwareState) -> dict[str, PyTree]:
  """Both trained generators' variables: ``{"pattern": ..., "mask": ...}`` (what a run saves)."""
  return {"pattern": state.generator, "mask": state.mask}


@dataclasses.dataclass(frozen=True, eq=False)
class Generated:
  """The input-aware trigger: per image, trunc(255·denormalize(x + m(x)⊙(g(x) − x))) with both
  generators in eval mode (BackdoorBench stores its backdoor test set the same way).

  Attributes:
    image_shape: (H, W, C) of the images.
    variables: ``{"pattern": G's variables, "mask": M's variables}``.
    normalization: the dataset's normalization (the generators work in normalized space).
    config: the attack's config (the generators' architecture).
  """
  image_shape: ImageShape
  variables: Any = dataclasses.field(repr=False)
  normalization: Normalization = Normalization((0.5,), (0.5,))
  config: InputAwareConfig = InputAwareConfig()
  name: ClassVar[str] = "input_aware"
  label_modes: ClassVar[tuple[str, ...]] = InputAwareConfig.label_modes

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """The triggered uint8 batch; ``key`` is ignored (the generators are deterministic)."""
    del key
    images = _check_batch(images, self.image_shape, "input_aware")
    mean, std = (jnp.asarray(v, jnp.float32) for v in (self.normalization.mean, self.normalization.std))
    channels = self.image_shape[-1]
    pattern_net, mask_net = self.config.generators(channels)
    x = normalize(images, mean, std)
    patterns = (pattern_net.apply(self.variables["pattern"], x) - mean) / std
    masks = threshold(mask_net.apply(self.variables["mask"], x))
    pixels = (blend(x, patterns, masks) * std + mean) * 255.0
    return jnp.floor(jnp.clip(pixels, 0.0, 255.0)).astype(jnp.uint8)
