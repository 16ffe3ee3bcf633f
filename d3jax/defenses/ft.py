"""FT — vanilla fine-tuning on the reserved clean set (spec §4.1).

BackdoorBench: SGD lr 0.01, momentum 0.9, weight decay 5e-4 on all parameters, cosine annealing
with T_max = 100 hard-coded and stepped per epoch, 100 epochs, batch 256, BN in train mode,
last model kept. Deviation: fp32 instead of AMP (spec §4.0).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from d3jax.train import FineTune, Hyperparams, Normalization, supervised, supervised_hyperparams


@dataclasses.dataclass(frozen=True)
class FTConfig:
  """Official FT defaults (spec §4.1). ``learning_rate`` and ``weight_decay`` are sweepable."""
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  cosine_t_max: int = 100
  crop_padding: int = 4
  flip: bool = False
  train_mode: bool = True


def hyperparams(config: FTConfig) -> Hyperparams:
  return supervised_hyperparams(config.learning_rate, config.weight_decay)


def program(model: nn.Module, normalization: Normalization, config: FTConfig) -> FineTune:
  return supervised(model, normalization, epochs=config.epochs, batch_size=config.batch_size,
                    momentum=config.momentum, cosine_t_max=config.cosine_t_max,
                    crop_padding=config.crop_padding, flip=config.flip, train_mode=config.train_mode)
