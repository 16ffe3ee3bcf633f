"""FP — Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-pruning: defending against backdooring
attacks on deep neural networks", RAID 2018, §4), as BackdoorBench's ``defense/fp.py`` runs it:
rank the head's input features (the pooled penultimate features of PreAct-ResNet18, not the last
conv's channels as in the paper) by mean activation on clean data, prune the least active ones
from the head in steps of ⌈0.01·F⌉ while the clean accuracy falls by less than 10%, then fine-tune
every parameter with FT's recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine with
T_max = 100 per epoch, 100 epochs, batch 256, BN in train mode), the pruned weights kept at zero.

Deliberate deviations from the reference:
* the stop criterion: BackdoorBench measures the accuracy on the *test* set; here on a held-out
  split (``holdout``, 10%) of the reserved set, the ranking coming from the rest. The rule: prune
  k = 0, s, 2s, … features while (ACC₀ − ACC_k)/ACC₀ < ``acc_ratio`` on the held-out split, and
  keep the largest k that passed (ACC₀ is the unpruned model's held-out accuracy);
* fixed bugs: BackdoorBench zeroes k − 1 features at step k (off by one) and, since its "kept"
  model is the pruned one itself, returns the model that already *violated* the threshold;
  here exactly k features are pruned and the kept k is the last one that passed;
* the activations are collected in eval mode without augmentation (the reference collects them
  with the training transform); the fine-tuning uses the whole reserved set (the held-out split
  only serves the threshold); fp32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from d3jax.data.splits import split_holdout
from d3jax.defenses.features import head_inputs
from d3jax.defenses.checks import check_fields
from d3jax.optim.prune import keep_pruned
from d3jax.engine.train import EpochCallback, Hyperparams, Normalization, Program, Restore, SGDConfig, train

PyTree = Any


def prune_depth(features: np.ndarray, order: np.ndarray, kernel: np.ndarray, bias: np.ndarray,
                labels: np.ndarray, step: int, acc_ratio: float) -> tuple[int, np.ndarray]:
  """The number k of features (first in ``order``) to prune from a dense head, and the held-out
  accuracy of every k tried (0, step, 2·step, … < F): the largest k such that every tried k' ≤ k
  lost less than ``acc_ratio`` of the unpruned accuracy."""
  depths = np.arange(0, features.shape[1], step)
  accuracies = []
  for k in depths:
    keep = np.ones(features.shape[1], np.float32)
    keep[order[:k]] = 0.0
    logits = features @ (kernel * keep[:, None]) + bias
    accuracies.append(float(np.mean(logits.argmax(-1) == labels)))
  accuracies = np.asarray(accuracies)
  passed = (accuracies[0] - accuracies) < acc_ratio * accuracies[0]
  last = len(depths) - 1 if passed.all() else int(np.argmin(passed)) - 1
  return int(depths[last]), accuracies


@dataclasses.dataclass(frozen=True)
class FPConfig(SGDConfig):
  """FP settings: pruning (``acc_ratio``, ``prune_step`` as a fraction of the features,
  ``holdout``, ``head``) and FT's fine-tuning recipe. FP runs in stages, so it is not sweepable
  as one program."""
  acc_ratio: float = 0.1
  prune_step: float = 0.01
  holdout: float = 0.1
  head: str = "linear"

  def __post_init__(self) -> None:
    super().__post_init__()
    check_fields(self, fractions=("acc_ratio", "prune_step", "holdout"))

  def optimizer(self, hparams: Hyperparams, steps_per_epoch: Any) -> optax.GradientTransformation:
    return optax.chain(super().optimizer(hparams, steps_per_epoch), keep_pruned(f"{self.head}/kernel"))

  def prune(self, model: nn.Module, variables: PyTree, images: np.ndarray, labels: np.ndarray,
            normalization: Normalization, key: jax.Array) -> tuple[PyTree, dict[str, Any]]:
    """The pruned variables and what was decided (features pruned, held-out accuracies)."""
    params = variables["params"]
    if self.head not in params or "kernel" not in params[self.head]:
      raise ValueError(f"head={self.head!r} is not a dense module of the model; its top-level "
                       f"modules are {', '.join(sorted(params))}.")
    rank_idx, hold_idx = split_holdout(np.arange(len(labels)), self.holdout, key)
    ranking = head_inputs(model, variables, images[rank_idx], normalization, self.head)
    order = np.argsort(ranking.mean(axis=0), kind="stable")
    kernel = np.asarray(params[self.head]["kernel"])
    bias = np.asarray(params[self.head].get("bias", np.zeros(kernel.shape[1], kernel.dtype)))
    step = math.ceil(kernel.shape[0] * self.prune_step)
    held_out = head_inputs(model, variables, images[hold_idx], normalization, self.head)
    depth, accuracies = prune_depth(held_out, order, kernel, bias, labels[hold_idx], step,
                                    self.acc_ratio)
    kernel = kernel.copy()
    kernel[order[:depth]] = 0.0
    pruned = {**variables, "params": {**params, self.head: {**params[self.head], "kernel": kernel}}}
    return pruned, {"pruned": depth, "features": int(kernel.shape[0]),
                    "holdout_acc": accuracies.tolist()}

  def defend(self, model: nn.Module, variables: PyTree, images: np.ndarray, labels: np.ndarray, *,
             normalization: Normalization, key: jax.Array, progress: bool = True,
             callback: EpochCallback | None = None, restore: Restore | None = None
             ) -> tuple[PyTree, dict[str, Any]]:
    """Prune (on the reserved set's splits), then fine-tune the pruned model on the reserved set."""
    prune_key, tune_key = jax.random.split(key)
    pruned, log = self.prune(model, variables, images, labels, normalization, prune_key)
    variables, history = train(Program(model, self, normalization), pruned, images, labels,
                               tune_key, desc="fp", progress=progress, callback=callback,
                               restore=restore)
    return variables, {**log, "losses": history.get("loss", np.zeros(0)).tolist()}
