"""NC — Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
identifying and mitigating backdoor attacks in neural networks", IEEE S&P 2019, §IV–VI), as
BackdoorBench's ``defense/nc.py`` runs it.

1. Reverse engineering: for every class t, a mask m (H×W) and a pattern p (H×W×C), both
   tanh(raw)/(2 + 1e-7) + 0.5 with raw started at 1, stamp x' = (1 − m)·x + m·p in [0, 1] pixel
   space; minimise CE(f(x'), t) + cost·‖m‖₁ with Adam (lr 0.1, betas 0.5, 0.9) over the
   reserved set, the classifier frozen in eval mode, for 80 epochs. After each epoch the mask is
   kept as the best if the epoch's attack accuracy ≥ 98% and its mean L1 norm is the lowest so
   far; the cost starts at 1e-3, is multiplied by 2 after 5 consecutive epochs at ≥ 98% and
   divided by 2^1.5 after 5 below (the last mask is used for a class that never reached 98%).
   All classes are reversed at once (vmapped).
2. Detection: with the masks' L1 norms L, median m̃ and MAD = 1.4826·median|L − m̃|, a label is
   flagged when L < m̃ and |L − m̃|/MAD > 2 (:func:`anomaly_index`).
3. Mitigation: when no label is flagged the model is returned unchanged (the log says so).
   Otherwise the reserved set is shuffled; for every flagged label, its last 20% is added again
   stamped with that label's reversed trigger and with its true labels; the model is fine-tuned on
   the union with FT's recipe (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine T_max 100 per
   epoch, 100 epochs, batch 256).

Deviations: no early stopping of the reverse engineering (every class runs ``nc_epochs``); a zero
``init_cost`` is refused (the reference's reset rule for a zero cost is not reproduced); the
reversed trigger is stamped on the uint8 images with rounding and clipping (the reference saves it
as min-max-normalised PNGs, reads them back and casts to uint8 with wrap-around); unlearning uses
the defender's reserved set itself, not a second random draw of the training set; no
augmentation during reverse engineering; fp32.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.data.augment import normalize
from d3jax.defenses.checks import check_fields
from d3jax.engine.train import (EpochCallback, Normalization, Program, Restore, SGDConfig, batch_plan,
                         train)

LOG = logging.getLogger("d3jax")
PyTree = Any
_SQUASH = 2.0 + 1e-7


def squash(raw: jax.Array) -> jax.Array:
  """tanh(raw)/(2 + 1e-7) + 0.5, a value in (0, 1)."""
  return jnp.tanh(raw) / _SQUASH + 0.5


def anomaly_index(norms: np.ndarray) -> np.ndarray:
  """|L − median(L)| / (1.4826·median|L − median(L)|) for every label's mask norm L (NC §IV-C)."""
  norms = np.asarray(norms, np.float64)
  median = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - median))
  deviation = np.abs(norms - median)
  return np.where(mad > 0, deviation / np.where(mad > 0, mad, 1.0), np.where(deviation > 0, np.inf, 0.0))


def flagged_labels(norms: np.ndarray, threshold: float) -> list[int]:
  """Labels whose norm is below the median with an anomaly index above ``threshold``."""
  norms = np.asarray(norms, np.float64)
  return [int(t) for t in np.flatnonzero((norms < np.median(norms)) & (anomaly_index(norms) > threshold))]


class _Trigger(NamedTuple):
  """One class's reverse-engineering state."""
  raw: tuple[jax.Array, jax.Array]
  adam: optax.OptState
  cost: jax.Array
  up: jax.Array
  down: jax.Array
  best: tuple[jax.Array, jax.Array]
  best_l1: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "config", "epochs"))
def _reverse(model: nn.Module, variables: PyTree, images: jax.Array, mean: jax.Array, std: jax.Array,
             key: jax.Array, config: "NCConfig", epochs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  height, width, channels = images.shape[1:]
  classes = model.apply(variables, jnp.zeros((1,) + images.shape[1:]), train=False).shape[-1]
  adam = optax.adam(config.mask_lr, b1=0.5, b2=0.9)

  def loss_fn(raw, batch, mask_rows, target, cost):
    mask, pattern = squash(raw[0]), squash(raw[1])
    x = batch.astype(jnp.float32) / 255.0
    stamped = normalize_unit((1 - mask) * x + mask * pattern, mean, std)
    logits = model.apply(variables, stamped, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(len(batch), target))
    valid = mask_rows.astype(jnp.float32)
    l1 = jnp.sum(jnp.abs(mask))
    loss = jnp.sum(ce * valid) / jnp.sum(valid) + cost * l1
    hits = jnp.sum((logits.argmax(-1) == target) * valid) / jnp.sum(valid)
    return loss, (hits, l1)

  def epoch(state: _Trigger, epoch_index, target):
    indices, rows = batch_plan(jax.random.fold_in(key, epoch_index), images.shape[0], config.batch_size)

    def step(state, plan):
      index, valid = plan
      grads, (hits, l1) = jax.grad(loss_fn, has_aux=True)(state.raw, images[index], valid, target, state.cost)
      updates, adam_state = adam.update(grads, state.adam, state.raw)
      return state._replace(raw=optax.apply_updates(state.raw, updates), adam=adam_state), (hits, l1)

    state, (hits, l1) = jax.lax.scan(step, state, (indices, rows))
    accuracy, norm = jnp.mean(hits), jnp.mean(l1)
    better = (accuracy >= config.attack_success) & (norm < state.best_l1)
    current = (squash(state.raw[0]), squash(state.raw[1]))
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), current, state.best)
    up = jnp.where(accuracy >= config.attack_success, state.up + 1, 0)
    down = jnp.where(accuracy >= config.attack_success, 0, state.down + 1)
    cost = jnp.where(up >= config.patience, state.cost * config.cost_multiplier,
                     jnp.where(down >= config.patience, state.cost / config.cost_multiplier ** 1.5,
                               state.cost))
    return state._replace(cost=cost, up=jnp.where(up >= config.patience, 0, up),
                          down=jnp.where(down >= config.patience, 0, down), best=best,
                          best_l1=jnp.where(better, norm, state.best_l1)), None

  def one_class(target):
    raw = (jnp.ones((height, width, 1)), jnp.ones((height, width, channels)))
    state = _Trigger(raw, adam.init(raw), jnp.float32(config.init_cost), jnp.int32(0), jnp.int32(0),
                     (squash(raw[0]), squash(raw[1])), jnp.float32(jnp.inf))
    state, _ = jax.lax.scan(lambda s, e: epoch(s, e, target), state, jnp.arange(epochs))
    found = jnp.isfinite(state.best_l1)
    mask = jnp.where(found, state.best[0], squash(state.raw[0]))
    pattern = jnp.where(found, state.best[1], squash(state.raw[1]))
    return mask, pattern, jnp.sum(jnp.abs(mask))

  return jax.vmap(one_class)(jnp.arange(classes))


def normalize_unit(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """(x − mean)/std for images already in [0, 1]."""
  return normalize(x * 255.0, mean, std)


def reverse_engineer(model: nn.Module, variables: PyTree, images: np.ndarray,
                     normalization: Normalization, key: jax.Array, config: "NCConfig"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every class's reversed (mask (C, H, W, 1), pattern (C, H, W, ch)) in [0, 1] and the masks'
  L1 norms (C,)."""
  masks, patterns, norms = _reverse(model, variables, jnp.asarray(images), jnp.asarray(normalization.mean),
                                    jnp.asarray(normalization.std), key, config, config.nc_epochs)
  return np.asarray(masks), np.asarray(patterns), np.asarray(norms)


def stamp(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
  """uint8 images with a reversed trigger: round((1 − m)·x + m·255·p), clipped to [0, 255]."""
  mixed = (1.0 - mask) * images.astype(np.float32) + mask * 255.0 * pattern
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class NCConfig(SGDConfig):
  """NC settings: reverse engineering (``nc_epochs``, ``mask_lr``, ``init_cost``,
  ``attack_success``, ``patience``, ``cost_multiplier``), detection (``anomaly_threshold``),
  unlearning (``unlearning_ratio``) and FT's fine-tuning recipe. NC runs in stages, so it is
  not sweepable as one program."""
  nc_epochs: int = 80
  mask_lr: float = 0.1
  init_cost: float = 1e-3
  attack_success: float = 0.98
  patience: int = 5
  cost_multiplier: float = 2.0
  anomaly_threshold: float = 2.0
  unlearning_ratio: float = 0.2

  def __post_init__(self) -> None:
    super().__post_init__()
    check_fields(self, counts=("nc_epochs", "patience"), positive=("mask_lr", "init_cost", "anomaly_threshold", "attack_success",
                                 "unlearning_ratio"), unit=("attack_success", "unlearning_ratio"))
    if not self.cost_multiplier > 1:
      raise ValueError(f"cost_multiplier must be > 1, got {self.cost_multiplier!r}.")

  def defend(self, model: nn.Module, variables: PyTree, images: np.ndarray, labels: np.ndarray, *,
             normalization: Normalization, key: jax.Array, progress: bool = True,
             callback: EpochCallback | None = None, restore: Restore | None = None
             ) -> tuple[PyTree, dict[str, Any]]:
    """Reverse-engineer every class, test for outliers, and unlearn the flagged triggers."""
    reverse_key, shuffle_key, tune_key = jax.random.split(key, 3)
    masks, patterns, norms = reverse_engineer(model, variables, images, normalization, reverse_key, self)
    flagged = flagged_labels(norms, self.anomaly_threshold)
    log = {"mask_norms": norms.tolist(), "anomaly_index": anomaly_index(norms).tolist(),
           "flagged": flagged, "losses": []}
    if not flagged:
      LOG.info("nc: no label flagged (anomaly index ≤ %g for every label below the median); the "
               "model is returned unchanged", self.anomaly_threshold)
      return variables, {**log, "unchanged": True}
    LOG.info("nc: flagged labels %s; unlearning their reversed triggers", flagged)
    order = np.asarray(jax.random.permutation(shuffle_key, len(labels)))
    tail = order[len(order) - math.ceil(self.unlearning_ratio * len(order)):]
    extra = [stamp(images[tail], masks[t], patterns[t]) for t in flagged]
    union_x = np.concatenate([images] + extra)
    union_y = np.concatenate([labels] + [labels[tail]] * len(flagged))
    variables, history = train(Program(model, self, normalization), variables, union_x, union_y,
                               tune_key, desc="nc", progress=progress, callback=callback,
                               restore=restore)
    return variables, {**log, "unchanged": False, "losses": history.get("loss", np.zeros(0)).tolist()}
