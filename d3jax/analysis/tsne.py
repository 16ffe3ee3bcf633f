"""t-SNE of penultimate features, clean vs poisoned, before and after defenses (the D3 paper,
Figure 3(a)/(b); scikit-learn's ``TSNE``).

Points are coloured by their true class; triggered images are drawn as crosses. In a backdoored
model the crosses gather in one cluster (the target's); after a good defense they return to the
clusters of their true classes.

Evaluation only: this needs the trigger (the backdoor test set); no defense may call it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from d3jax.analysis.data import Paired
from d3jax.analysis.plotting import pyplot, save
from d3jax.analysis.probe import penultimate
from d3jax.engine.train import Normalization


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """2-D t-SNE of (N, D) features (perplexity min(30, (N − 1)/3), PCA init)."""
  from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel
  perplexity = min(30.0, (len(features) - 1) / 3)
  return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
      np.asarray(features, np.float64))


def plot_tsne(model: Any, models: Mapping[str, Any], data: Paired, normalization: Normalization,
              path: str | Path, title: str, seed: int = 0) -> Path:
  """One panel per model (e.g. ``{"backdoored": ..., "d3": ...}``): t-SNE of the penultimate
  features of ``data.clean`` (dots) and ``data.poisoned`` (crosses), coloured by true class."""
  images = np.concatenate([data.clean, data.poisoned])
  classes = np.concatenate([data.label, data.label])
  poisoned = np.arange(len(images)) >= len(data.clean)
  plt = pyplot()
  fig, panels = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.4), squeeze=False)
  for ax, (name, variables) in zip(panels[0], models.items()):
    points = embed(penultimate(model, variables, images, normalization), seed)
    for marker, rows, size in (("o", ~poisoned, 8), ("x", poisoned, 16)):
      ax.scatter(points[rows, 0], points[rows, 1], c=classes[rows], cmap="tab10", vmin=-0.5,
                 vmax=9.5, marker=marker, s=size, linewidths=0.8)
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [plt.Line2D([], [], color="grey", marker="o", linestyle="", label="clean"),
             plt.Line2D([], [], color="grey", marker="x", linestyle="", label="poisoned")]
  panels[0][-1].legend(handles=handles, loc="best", fontsize=8)
  fig.suptitle(title + "  (colour: true class)")
  return save(fig, path)
