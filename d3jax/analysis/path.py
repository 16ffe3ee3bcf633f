"""Loss and accuracy along the straight path from the backdoored to a defended model (the D3
paper, §3.2 and Figure 2).

θ_t = θ_init + t·(θ_def − θ_init) for t ∈ [0, 2]: t = 0 is the backdoored model, t = 1 the
defended one, t > 1 extrapolates beyond it. At every t: the clean loss and ACC on clean test
images, and the backdoor loss (cross-entropy towards the attack's label, Eq. (2)) and ASR on the
backdoor test set. Every t is evaluated in one ``jax.vmap`` over t.

BatchNorm running statistics follow the same path: means linearly, variances geometrically
(exp of the interpolated log), so they stay positive for every t and are exact at t = 0 and 1.

Evaluation only: this needs the trigger (the backdoor test set); no defense may call it.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.analysis.plotting import pyplot, save
from d3jax.data.augment import normalize
from d3jax.engine.train import Normalization

TINY_VARIANCE = 1e-12  # floor under running variances before the log (BN adds ε = 1e-5 anyway)


class PathCurves(NamedTuple):
  """Arrays of shape (T,), one value per t."""
  t: np.ndarray
  clean_loss: np.ndarray
  backdoor_loss: np.ndarray
  acc: np.ndarray
  asr: np.ndarray


def interpolate(initial: Any, final: Any, t: jax.Array) -> Any:
  """θ_init + t·(θ_def − θ_init) for params and BN means; variances geometrically."""
  def mix(path, a, b):
    if [getattr(path[0], "key", None), getattr(path[-1], "key", None)] == ["batch_stats", "var"]:
      log_a = jnp.log(jnp.maximum(a, TINY_VARIANCE))
      log_b = jnp.log(jnp.maximum(b, TINY_VARIANCE))
      return jnp.exp(log_a + t * (log_b - log_a))
    return a + t * (b - a)
  return jax.tree_util.tree_map_with_path(mix, initial, final)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def _sums(model, initial, final, ts, images, labels, group, mean, std, batch_size):
  """(T, 2, 2): per t and per group (0 clean, 1 backdoor), the summed cross-entropy and the number
  of correct predictions."""
  n = images.shape[0]
  batches = math.ceil(n / batch_size)

  def batched(a):
    return jnp.resize(a, (batches * batch_size,) + a.shape[1:]).reshape(
        (batches, batch_size) + a.shape[1:])

  valid = (jnp.arange(batches * batch_size) < n).reshape(batches, batch_size)
  member = jax.nn.one_hot(batched(group), 2) * valid[..., None]  # (B, batch, 2)

  def at(t):
    variables = interpolate(initial, final, t)

    def one(batch):
      xb, yb, mb = batch
      logits = model.apply(variables, normalize(xb, mean, std), train=False)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      correct = (logits.argmax(-1) == yb).astype(jnp.float32)
      return jnp.stack([ce @ mb, correct @ mb], axis=-1)

    return jax.lax.map(one, (batched(images), batched(labels), member)).sum(0)

  return jax.vmap(at)(ts)


def path_curves(model: Any, initial: Any, defended: Any, clean: tuple[np.ndarray, np.ndarray],
                backdoor: tuple[np.ndarray, np.ndarray], normalization: Normalization,
                ts: Sequence[float] | None = None, batch_size: int = 250) -> PathCurves:
  """The curves of Figure 2 along θ_init + t·(θ_def − θ_init), every t in one vmapped call.

  Args:
    clean: clean test (images, true labels).
    backdoor: triggered test (images, the attack's labels) — evaluation only.
    ts: the values of t (default: 41 points over [0, 2]).
  """
  ts = np.linspace(0.0, 2.0, 41) if ts is None else np.asarray(ts, np.float32)
  images = np.concatenate([clean[0], backdoor[0]])
  labels = np.concatenate([clean[1], backdoor[1]]).astype(np.int32)
  group = np.repeat(np.arange(2, dtype=np.int32), [len(clean[0]), len(backdoor[0])])
  sums = _sums(model, initial, defended, jnp.asarray(ts, jnp.float32), jnp.asarray(images),
               jnp.asarray(labels), jnp.asarray(group), jnp.asarray(normalization.mean),
               jnp.asarray(normalization.std), min(batch_size, len(images)))
  means = np.asarray(sums) / np.array([len(clean[0]), len(backdoor[0])])[None, :, None]
  return PathCurves(np.asarray(ts), means[:, 0, 0], means[:, 1, 0], means[:, 0, 1], means[:, 1, 1])


def plot_paths(curves: Mapping[str, PathCurves], path: str | Path, title: str) -> Path:
  """Figure 2's two panels, one colour per defense: losses (clean solid, backdoor dashed) and
  ACC (solid) / ASR (dashed) against t, with t = 1 (the defended model) marked."""
  plt = pyplot()
  fig, (loss_ax, rate_ax) = plt.subplots(1, 2, figsize=(11, 4))
  for index, (name, c) in enumerate(curves.items()):
    colour = f"C{index}"
    loss_ax.plot(c.t, c.clean_loss, color=colour, label=f"{name}: clean loss")
    loss_ax.plot(c.t, c.backdoor_loss, color=colour, linestyle="--", label=f"{name}: backdoor loss")
    rate_ax.plot(c.t, 100 * c.acc, color=colour, label=f"{name}: ACC")
    rate_ax.plot(c.t, 100 * c.asr, color=colour, linestyle="--", label=f"{name}: ASR")
  for ax, label in ((loss_ax, "cross-entropy"), (rate_ax, "%")):
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("t   (θ_init + t·(θ_def − θ_init); t = 1 is the defended model)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  loss_ax.set_yscale("log")
  rate_ax.set_ylim(-2, 102)
  fig.suptitle(title)
  return save(fig, path)
