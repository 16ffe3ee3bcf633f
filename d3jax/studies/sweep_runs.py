"""Sweep run directories: a grid of one defense on an attack run, measured and drawn.

``write_sweep`` trains every point of the grid (and every seed) as one vmapped program
(:func:`d3jax.workflows.sweep.sweep`) on the reserved training part, then measures each run. A sweep run
holds ``config.json``; ``results.csv`` (one line per configuration: the swept values, then
mean and std over seeds of ACC/ASR/RA/DER on the test sets and of what the defender can see, the
held-out accuracy and the weight distance); ``metrics.json`` (the same rows, every single run,
the baseline and the wall time); ``table.txt`` (the paper's Tables 6–7 layout); ``heatmap.png``
(ACC and ASR over the swept hyperparameters, when there are at most two); ``log.txt``; and, only when asked, the
variables of every run as one stacked orbax checkpoint ``variables/`` (leading axis = runs, in
``metrics.json``'s order). Built in a hidden sibling and renamed into place, with a manifest.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from d3jax.rundirs import checkpoint
from d3jax.analysis.grid import format_grid_table, heatmap, write_csv
from d3jax.workflows.auto_choice import heldout_accuracy, weight_distance
from d3jax.metrics import der
from d3jax.workflows.pipeline import Backdoored, ReservedSplit, check_reserved_shape
from d3jax.progress import progress_bar
from d3jax.rundirs.runs import LoadedRun, RunWriter
from d3jax.workflows.sweep import aggregate, grid_points, sweep

LOG = logging.getLogger("d3jax")


def defense_key(split: ReservedSplit) -> jax.Array:
  """The defense key of a reserved split: the one `d3jax defend` uses with the same split."""
  return jax.random.fold_in(jax.random.key(split.seed), 3)


def write_sweep(source: LoadedRun, name: str, config: Any, split: ReservedSplit,
                grid: Mapping[str, Sequence[float]], out: str | Path, *, seeds: int = 1,
                chunk_size: int | None = None, save_variables: bool = False,
                overwrite: bool = False, progress: bool = True) -> tuple[Path, list[dict], str]:
  """Sweeps defense ``name`` over ``grid`` on the attack run ``source`` into ``out``.

  Returns the run path, the per-configuration rows and the printed table.
  """
  if source.kind != "attack":
    raise ValueError(f"--attack-run {source.path} is a {source.kind} run; pass a run written by "
                     "`d3jax attack`.")
  writer = RunWriter(out, overwrite=overwrite, inputs=[source.path], resumable=False)
  grid_points(config.hyperparams(), grid)  # unknown names fail here, before anything is written
  backdoored = source.backdoored
  (images, labels), heldout = split.draw(backdoored.dataset)
  check_reserved_shape(images, backdoored)
  start = time.perf_counter()
  with writer:
    writer.start({**{k: source.config[k] for k in ("attack", "model", "dataset")},
                  "kind": "sweep", "defense": {"name": name, "config": dataclasses.asdict(config)},
                  "grid": {k: list(v) for k, v in grid.items()}, "seeds": seeds,
                  "reserved": dataclasses.asdict(split), "baseline": backdoored.baseline._asdict()})
    defended, log = sweep(name, backdoored.model, backdoored.variables, images, labels,
                          normalization=backdoored.normalization, key=defense_key(split), grid=grid,
                          config=config, seeds=seeds, chunk_size=chunk_size, progress=progress)
    train_s = time.perf_counter() - start
    per_run = measure_runs(backdoored, config, defended, heldout, progress)
    rows = aggregate(log, per_run)
    swept = list(grid)
    table = format_grid_table(rows, swept)
    stage = writer.stage
    write_csv(rows, stage / "results.csv")
    (stage / "table.txt").write_text(table + "\n")
    heatmap(rows, tuple(swept), stage / "heatmap.png",
            f"{backdoored.run.attack} → {name}: {len(rows)} configurations × {seeds} seed(s)")
    runs = [{**{k: log["hparams"][k][i] for k in swept}, "seed": log["seeds"][i],
             **{column: values[i] for column, values in per_run.items()}}
            for i in range(len(defended))]
    metrics = {"configs": rows, "runs": runs, "baseline": backdoored.baseline._asdict(),
               "train_wall_time_s": train_s, "wall_time_s": time.perf_counter() - start}
    config_json = checkpoint.load_json(stage, "config.json")
    if save_variables:
      stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *defended)
      checkpoint.save_run(stage, stacked, config=config_json, metrics=metrics)
    else:
      checkpoint.save_json(stage / "metrics.json", metrics)
    LOG.info("sweep of %d runs trained in %.1f s", len(defended), train_s)
  path = checkpoint.finish_run(writer.stage, writer.out)
  return path, rows, table


def measure_runs(backdoored: Backdoored, config: Any, defended: Sequence[Any],
                 heldout: tuple[np.ndarray, np.ndarray] | None, progress: bool = True
                 ) -> dict[str, list[float]]:
  """Per run: ACC/ASR/RA/DER on the test sets (evaluation only) and what a defender sees, the
  held-out accuracy (when there is a held-out part) and the weight distance."""
  before = backdoored.baseline
  columns: dict[str, list[float]] = {"acc": [], "asr": [], "ra": [], "der": [], "distance": []}
  if heldout is not None:
    columns["heldout_acc"] = []
  for variables in progress_bar(defended, desc="measure", disable=not progress):
    measured = backdoored.measure(variables)
    for column in ("acc", "asr", "ra"):
      columns[column].append(getattr(measured, column))
    columns["der"].append(der(before.acc, before.asr, measured.acc, measured.asr))
    columns["distance"].append(weight_distance(config, backdoored.variables, variables))
    if heldout is not None:
      columns["heldout_acc"].append(heldout_accuracy(backdoored.model, variables, *heldout,
                                                     backdoored.normalization))
  return columns
