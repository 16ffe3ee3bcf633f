"""WaNet: Nguyen & Tran, "WaNet — imperceptible warping-based backdoor attack", ICLR 2021.

A training-controlled attack: a fixed warp (:mod:`d3jax.attacks.warp`) is the trigger, and
during training each batch gets backdoor samples (warped, relabelled) and "noise mode" cross
samples (warped with a randomly perturbed grid, labels kept) so the model learns the exact warp
rather than warping in general (Sec. 3.3). The fixed warp is also a plain pixel-space trigger
(:class:`d3jax.attacks.warp.Warp`) for the backdoor test set.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3jax.attacks.training import AttackTrainConfig, BatchPoisonTraining
from d3jax.attacks.triggers import ImageShape, _image_shape
from d3jax.attacks.warp import Warp, grid_offsets, warp, warp_field
from d3jax.engine.train import Batch, Normalization, Program, TrainState

_WANET_STREAM = 3


@dataclasses.dataclass(frozen=True)
class WaNetConfig:
  """WaNet (Nguyen & Tran, ICLR 2021) with BackdoorBench's defaults (k 4, s 0.5, grid rescale 1,
  cross ratio 2).

  Deviations from BackdoorBench: the field is drawn with ``jax.random`` from ``seed`` (not
  bit-identical to PyTorch's draw) and upsampled to H×W (BackdoorBench upsamples to H×H, which
  only matters for non-square images).

  Attributes:
    k: side of the control grid of random offsets.
    strength: s, the warp's strength (0 leaves images unchanged).
    grid_rescale: factor on the sampling grid (1 keeps it).
    cross_ratio: noise-mode (cross) samples per backdoor sample in each training batch.
    seed: seed of the warp field.
  """

  k: int = 4
  strength: float = 0.5
  grid_rescale: float = 1.0
  cross_ratio: float = 2.0
  seed: int = 0
  name: ClassVar[str] = "wanet"
  label_modes: ClassVar[tuple[str, ...]] = Warp.label_modes
  kind: ClassVar[str] = "training"
  crafts_on: ClassVar[str] = "nothing"
  trains_on: ClassVar[str] = "clean"

  def __post_init__(self) -> None:
    if self.k < 2:
      raise ValueError(f"WaNet k must be ≥ 2 (a k×k control grid), got {self.k}.")
    if self.strength < 0 or self.grid_rescale <= 0 or self.cross_ratio < 0:
      raise ValueError(
          "WaNet strength and cross_ratio must be ≥ 0 and grid_rescale > 0, got "
          f"{self.strength}, {self.cross_ratio} and {self.grid_rescale}.")

  def offsets(self, height: int, width: int) -> jax.Array:
    """The backdoor grid's offsets from the identity, (H, W, 2)."""
    field = warp_field(jax.random.key(self.seed), self.k, height, width)
    return grid_offsets(field, self.strength, self.grid_rescale)

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> Warp:
    """The fixed warp of this config as a uint8 trigger (``clean``, ``target``, ``key`` unused)."""
    del clean, target, key
    height, width, _ = _image_shape(image_shape)
    return Warp(image_shape, self.offsets(height, width))

  def program(self, model: nn.Module, recipe: AttackTrainConfig, normalization: Normalization, *,
              ratio: float, target: int, label_mode: str, num_classes: int) -> "WaNetProgram":
    """The program that trains ``model`` with ``recipe`` and this warp on the clean training set,
    backdooring a ``ratio`` share of every batch toward ``target``."""
    training = WaNetTraining(**dataclasses.asdict(recipe), attack=self, ratio=ratio, target=target,
                             label_mode=label_mode, num_classes=num_classes)
    return WaNetProgram(model, training, normalization)


@dataclasses.dataclass(frozen=True)
class WaNetTraining(BatchPoisonTraining):
  """The training recipe of WaNet: BackdoorBench's backdoor-training recipe plus the attack.

  Per batch of b samples (BackdoorBench's ``attack/wanet.py``), the first ``int(ratio·b)`` are
  warped and relabelled (target-class samples included), the next ``int(ratio·b·cross_ratio)`` are
  warped with their own noisy grid (backdoor grid + U(−1, 1)/H per coordinate; labels kept), the
  rest stay clean; then the usual augmentation and the cross-entropy step. Deviations: the warp
  acts on pixel values before augmentation and normalization (BackdoorBench warps normalized
  tensors; bilinear sampling commutes with the per-channel affine normalization except at the zero
  padding, which the clipped grid never reaches); augmentation is the engine's per-sample crop and
  flip instead of BackdoorBench's batch-level crop (padding 5, probability 0.8) and ±10° rotation
  (probability 0.5); a ratio·b below 1 gives no backdoor sample (BackdoorBench draws one with
  probability ratio·b); the noisy grid is clipped once, after adding the noise.

  Attributes:
    attack: the WaNet config (warp field and cross ratio); the rest as
      :class:`d3jax.attacks.training.BatchPoisonTraining`.
  """
  attack: WaNetConfig = WaNetConfig()
  title: ClassVar[str] = "WaNet"

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.counts[0] + self.counts[1] > self.batch_size:
      raise ValueError(
          f"WaNet ratio {self.ratio} with cross_ratio {self.attack.cross_ratio} needs "
          f"{sum(self.counts)} warped samples per batch of {self.batch_size}; lower them.")

  @property
  def counts(self) -> tuple[int, int]:
    """(backdoor, cross) samples per batch."""
    backdoor = int(self.ratio * self.batch_size)
    return backdoor, int(backdoor * self.attack.cross_ratio)


@dataclasses.dataclass(frozen=True, eq=False)
class WaNetProgram(Program):
  """A :class:`d3jax.engine.train.Program` that poisons every batch as :class:`WaNetTraining` says.

  Train it on the CLEAN training set with :func:`d3jax.engine.train.train`; measure it with the
  backdoor test set of ``recipe.attack.trigger(image_shape)``.
  """
  recipe: WaNetTraining

  def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(jax.random.fold_in(state.key, _WANET_STREAM), state.step)
    images, labels = poison_batch(self.recipe, batch.image, batch.label, key)
    return super().step(state, Batch(images, labels, batch.mask))


def poison_batch(recipe: WaNetTraining, images: jax.Array, labels: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """WaNet's per-batch poisoning of uint8 (B, H, W, C) images: float pixel values and labels."""
  backdoor, cross = recipe.counts
  _, height, width, _ = images.shape
  offsets = recipe.attack.offsets(height, width)
  noise = jax.random.uniform(key, (cross, height, width, 2), jnp.float32, -1.0, 1.0) / height
  grids = jnp.concatenate([jnp.broadcast_to(offsets, (backdoor, height, width, 2)), offsets + noise])
  x = images.astype(jnp.float32)
  warped = warp(x[:backdoor + cross], grids)
  x = jnp.concatenate([warped, x[backdoor + cross:]])
  return x, jnp.concatenate([recipe.backdoor_labels(labels[:backdoor]), labels[backdoor:]])
