"""Neuron weight norm against trigger-activation change (TAC) in the last convolution (the FT-SAM
paper, Figure 4; TAC as BackdoorBench's ``visual_tac``).

TAC of channel k = mean over images of Σ over positions of |A_k(x + Δ) − A_k(x)|, the change the
trigger causes in that channel's output, measured on the backdoored model; the weight norm of
channel k is ‖W[..., k]‖₂ of the layer's kernel, for each model. Backdoor-related channels (large
TAC) tend to have large norms in a backdoored model; vanilla fine-tuning barely changes them.

Evaluation only: this needs the trigger (the backdoor test set); no defense may call it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from d3jax.analysis.data import Paired
from d3jax.analysis.plotting import pyplot, save
from d3jax.analysis.probe import activations
from d3jax.engine.train import Normalization


def trigger_activation_change(model: Any, variables: Any, data: Paired, normalization: Normalization,
                              layer: str) -> np.ndarray:
  """TAC per output channel of ``layer``, shape (K,)."""
  clean = activations(model, variables, data.clean, normalization, layer)
  poisoned = activations(model, variables, data.poisoned, normalization, layer)
  return np.abs(poisoned - clean).sum(axis=(1, 2)).mean(axis=0)


def neuron_norms(variables: Any, layer: str) -> np.ndarray:
  """‖W[..., k]‖₂ of the layer's kernel (kh, kw, cin, K) for each output channel k, shape (K,)."""
  tree = variables["params"]
  for name in layer.split("/"):
    tree = tree[name]
  kernel = np.asarray(tree["kernel"])
  return np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)


def plot_tac(model: Any, backdoored: Any, models: Mapping[str, Any], data: Paired,
             normalization: Normalization, layer: str, path: str | Path, title: str) -> Path:
  """Scatter of channel weight norm (each model of ``models``) against TAC (the backdoored
  model's), one colour per model."""
  tac = trigger_activation_change(model, backdoored, data, normalization, layer)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.4))
  for index, (name, variables) in enumerate(models.items()):  # hollow, shrinking: overlaps show
    ax.scatter(tac, neuron_norms(variables, layer), s=60 / (1 + index), facecolors="none",
               edgecolors=f"C{index}", linewidths=1.2, label=name)
  ax.set_xlabel(f"TAC of the backdoored model ({layer})")
  ax.set_ylabel("neuron weight norm ‖W[..., k]‖₂")
  ax.legend()
  ax.set_title(title)
  return save(fig, path)
