"""Training a (backdoored) model on a poisoned training set with the BackdoorBench recipe (spec §3.1).

SGD lr 0.01, momentum 0.9, coupled weight decay 5e-4 on every parameter, cosine annealing
stepped per epoch with T_max = 100 (BackdoorBench hard-codes 100 regardless of the epoch count),
batch 128, mean cross-entropy, train-time random crop (padding 4) after trigger insertion, last
model kept. Every setting is configurable. Deviation: the last partial batch is kept (padded and
masked) instead of dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from d3jax.attacks.poison import PoisonedSet
from d3jax.train import Normalization, init_variables, supervised, supervised_hyperparams


@dataclasses.dataclass(frozen=True)
class AttackTrainConfig:
  """The BackdoorBench CIFAR-10 training recipe (spec §3.1), except ``epochs`` (paper: 100)."""
  epochs: int = 100
  batch_size: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  cosine_t_max: int = 100
  crop_padding: int = 4
  flip: bool = False


def train_backdoored(model: nn.Module, poisoned: PoisonedSet, normalization: Normalization,
                     config: AttackTrainConfig, key: jax.Array, *, variables: Any = None,
                     progress: bool = True, desc: str = "attack") -> tuple[Any, np.ndarray]:
  """Trains ``model`` (from fresh variables unless given) on the poisoned set.

  Returns the final variables and the per-epoch mean training losses.
  """
  init_key, train_key = jax.random.split(key)
  if variables is None:
    variables = init_variables(model, poisoned.x.shape[1:], init_key)

  program = supervised(model, normalization, epochs=config.epochs, batch_size=config.batch_size,
                       momentum=config.momentum, cosine_t_max=config.cosine_t_max,
                       crop_padding=config.crop_padding, flip=config.flip)
  hparams = supervised_hyperparams(config.learning_rate, config.weight_decay)
  return program.fit(variables, poisoned.x, poisoned.y, hparams, train_key, desc=desc, progress=progress)
