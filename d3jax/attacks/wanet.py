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

import jax

from d3jax.attacks.triggers import ImageShape, _image_shape
from d3jax.attacks.warp import Warp, grid_offsets, warp_field


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

  def __post_init__(self) -> None:
    if self.k < 2:
      raise ValueError(f"WaNet k must be ≥ 2 (a k×k control grid), got {self.k}.")
    if self.strength < 0 or self.grid_rescale <= 0 or self.cross_ratio < 0:
      raise ValueError(
          "WaNet strength and cross_ratio must be ≥ 0 and grid_rescale > 0, got "
          f"{self.strength}, {self.cross_ratio} and {self.grid_rescale}.")

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> Warp:
    """The fixed warp of this config as a uint8 trigger (``clean``, ``target``, ``key`` unused)."""
    del clean, target, key
    height, width, _ = _image_shape(image_shape)
    field = warp_field(jax.random.key(self.seed), self.k, height, width)
    return Warp(image_shape, grid_offsets(field, self.strength, self.grid_rescale))
