"""How far each defense moved the selected weights: histograms of θ_def − θ_init (the D3 paper,
Figure 3(c): vanilla fine-tuning in blue, D3 in green, on the selected layer).

Needs only the models, no data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from d3jax import optim
from d3jax.analysis.plotting import pyplot, save

COLOURS = {"ft": "tab:blue", "d3": "tab:green"}


def weight_differences(initial: Any, defended: Any, select: str) -> np.ndarray:
  """θ_def − θ_init of every parameter whose '/'-joined path fully matches ``select``, flattened
  (a ``select`` that matches nothing raises ValueError listing the paths)."""
  mask = optim.select_mask(initial["params"], select)
  parts = [np.ravel(np.asarray(d) - np.asarray(i)) for i, d, m in
           zip(jax.tree.leaves(initial["params"]), jax.tree.leaves(defended["params"]),
               jax.tree.leaves(mask)) if m]
  return np.concatenate(parts)


def plot_weight_differences(initial: Any, defended: Mapping[str, Any], select: str,
                            path: str | Path, title: str, bins: int = 60) -> Path:
  """Overlaid histograms of θ_def − θ_init over the selected parameters, one per defense, on
  shared bins; the legend gives each defense's ‖θ_def − θ_init‖ (Frobenius, over the selection)."""
  diffs = {name: weight_differences(initial, variables, select) for name, variables in defended.items()}
  edges = np.histogram_bin_edges(np.concatenate(list(diffs.values())), bins=bins)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for index, (name, diff) in enumerate(diffs.items()):
    ax.hist(diff, bins=edges, alpha=0.55, color=COLOURS.get(name, f"C{index + 2}"),
            label=f"{name}: ‖Δ‖ = {np.linalg.norm(diff):.3g}")
  ax.set_xlabel(f"θ_def − θ_init  ({select}, {len(next(iter(diffs.values())))} weights)")
  ax.set_ylabel("count")
  ax.legend()
  ax.set_title(title)
  return save(fig, path)
