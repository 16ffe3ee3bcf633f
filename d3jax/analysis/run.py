"""``d3jax analyze``: every analysis of an attack run and its defense runs, as PNGs.

Evaluation only: path curves, t-SNE, Grad-CAM and TAC read the backdoor test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from d3jax.analysis.data import Paired, paired, subsample
from d3jax.analysis.gradcam import plot_gradcam
from d3jax.analysis.path import path_curves, plot_paths
from d3jax.analysis.probe import last_conv
from d3jax.analysis.tac import plot_tac
from d3jax.analysis.tsne import plot_tsne
from d3jax.analysis.weights import plot_weight_differences
from d3jax.progress import progress_bar
from d3jax.rundirs.runs import LoadedRun

ANALYSES = ("path", "weights", "tsne", "gradcam", "tac")
NEEDS_DEFENSE = ("path", "weights")


def defense_labels(attack: LoadedRun, defended: Sequence[LoadedRun]) -> dict[str, Any]:
  """``{defense name: defended variables}`` after checking each run defends ``attack``'s model
  (same attack config and dataset); repeated names get a numeric suffix."""
  out: dict[str, Any] = {}
  for run in defended:
    if run.kind != "defense":
      raise ValueError(f"--defended {run.path} is a {run.kind} run; pass runs written by `d3jax defend`.")
    if run.config["attack"] != attack.config["attack"] or run.config["dataset"] != attack.config["dataset"]:
      raise ValueError(f"--defended {run.path} defends another attack run than {attack.path}; pass "
                       "defense runs of this attack run.")
    name = run.config["defense"]["name"]
    label, count = name, 2
    while label in out:
      label, count = f"{name}-{count}", count + 1
    out[label] = run.backdoored.variables
  return out


def _take(data: Paired, rows: np.ndarray) -> Paired:
  return Paired(*(field[rows] for field in data))


def analyze(attack: LoadedRun, defended: Mapping[str, Any], out_dir: str | Path,
            analyses: Sequence[str] = ANALYSES, *, samples: int = 200, images: int = 3,
            select: str = "linear/kernel", layer: str | None = None, steps: int = 41,
            seed: int = 0, progress: bool = True) -> dict[str, Path]:
  """Writes ``<analysis>.png`` into ``out_dir`` for each of ``analyses``; returns their paths.

  Args:
    attack: the attack run (its model is "before").
    defended: defended variables of that model by label (e.g. ``{"ft": ..., "d3": ...}``).
    samples: test images (and their triggered copies) for t-SNE and TAC.
    images: images (clean and triggered) shown by Grad-CAM.
    select: parameters of the weight-difference histograms (regex over parameter paths).
    layer: layer of Grad-CAM and TAC (default: the last convolution).
    steps: values of t in [0, 2] for the path curves.
  """
  unknown = sorted(set(analyses) - set(ANALYSES))
  if unknown:
    raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}.")
  needing = [name for name in analyses if name in NEEDS_DEFENSE]
  if needing and not defended:
    raise ValueError(f"{', '.join(needing)} compare a defense with the backdoored model; pass at "
                     "least one --defended run.")
  backdoored = attack.backdoored
  model, initial, norm = backdoored.model, backdoored.variables, backdoored.normalization
  data = paired(backdoored)
  models = {"backdoored": initial, **defended}
  attack_name = backdoored.run.attack
  if layer is None and {"gradcam", "tac"} & set(analyses):
    layer = last_conv(model, initial, backdoored.dataset.image_shape)
  out_dir = Path(out_dir)
  written = {}
  for name in progress_bar(analyses, desc="analyze", disable=not progress):
    path = out_dir / f"{name}.png"
    if name == "path":
      dataset, bd = backdoored.dataset, backdoored.backdoor_test
      ts = np.linspace(0.0, 2.0, steps)
      curves = {label: path_curves(model, initial, variables, (dataset.x_test, dataset.y_test),
                                   (bd.x, bd.y), norm, ts) for label, variables in defended.items()}
      written[name] = plot_paths(curves, path, f"{attack_name}: loss and accuracy along "
                                 "θ_init + t·(θ_def − θ_init)")
    elif name == "weights":
      written[name] = plot_weight_differences(initial, defended, select, path,
                                              f"{attack_name}: weight changes")
    elif name == "tsne":
      subset = _take(data, subsample(samples, len(data.clean), seed))
      written[name] = plot_tsne(model, models, subset, norm, path,
                                f"{attack_name}: penultimate features", seed)
    elif name == "gradcam":
      subset = _take(data, subsample(images, len(data.clean), seed))
      written[name] = plot_gradcam(model, models, subset, norm, layer, path, attack_name)
    else:
      subset = _take(data, subsample(samples, len(data.clean), seed))
      written[name] = plot_tac(model, initial, models, subset, norm, layer, path,
                               f"{attack_name}: neuron norm vs trigger-activation change")
  return written


__all__ = ["ANALYSES", "analyze", "defense_labels"]
