"""FT — vanilla fine-tuning on the reserved clean set (spec §4.1).

BackdoorBench: SGD lr 0.01, momentum 0.9, weight decay 5e-4 on all parameters, cosine annealing
with T_max = 100 hard-coded and stepped per epoch, 100 epochs, batch 256, BN in train mode,
last model kept. Deviation: fp32 instead of AMP (spec §4.0).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from d3jax.train import FineTune, Hyperparams, Normalization, SGDConfig


@dataclasses.dataclass(frozen=True)
class FTConfig(SGDConfig):
  """Official FT defaults (spec §4.1). ``learning_rate`` and ``weight_decay`` are sweepable."""


def hyperparams(config: FTConfig) -> Hyperparams:
  return config.hyperparams()


def program(model: nn.Module, normalization: Normalization, config: FTConfig) -> FineTune:
  return config.program(model, normalization)
