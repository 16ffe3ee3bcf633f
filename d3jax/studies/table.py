"""The D3 paper's Table 1 as one command: attacks × defenses × seeds on one dataset.

Every attack run and every defense run is an ordinary run directory under the table's output
(``attacks/<attack>-s<seed>`` and ``defenses/<attack>-s<seed>/<defense>``), written by
:func:`d3jax.rundirs.runs.write_attack` and :func:`d3jax.rundirs.runs.write_defense`. A finished run is read back,
never retrained; an interrupted one resumes after its last finished epoch; so running the same
table again continues where it stopped. The result is printed in the paper's layout (one row per
attack and an average row; ACC/ASR/DER per defense, in percent, mean ± std over seeds; the best
and second-best defense of each row marked ``*`` and ``+`` per metric) and written as
``table.csv`` (one row per run), ``table.json`` (runs and cell summaries) and ``der.png`` (a heat
map of the mean DER).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from d3jax import defenses
from d3jax.rundirs import checkpoint, runs
from d3jax.attacks.training import AttackTrainConfig
from d3jax.workflows.pipeline import AttackRun, ReservedSplit, check_field

LOG = logging.getLogger("d3jax")
METRICS = ("acc", "asr", "der")


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """What a table runs.

  Attributes:
    dataset: the dataset of every attack (``digits``, ``mnist5k``, ``npz:<path>``, ``tfds:…``).
    model: the model of every attack.
    model_options: options of that model, e.g. ``width`` (``--model-options width 16``).
    attacks: registered attack names, one table row each.
    defenses: registered defense names, one column group each, with their default settings.
    seeds: repeats of every cell; seed s trains the attack with seed s and draws the reserved set
      and runs the defense with seed s.
    poison_ratio: poisoning ratio of every attack.
    ratios: per-attack overrides of ``poison_ratio`` (``--ratios sig 0.05``), e.g. for a
      clean-label attack, which can poison at most its target class.
    target: target class of every attack.
    train: the attacks' training recipe.
    defense_epochs: caps every defense's ``epochs`` at this many (a defense with fewer by default,
      e.g. i-BAU's 5, keeps its own; 0: no cap), for tables that must fit a compute budget.
    reserved_ratio: the defender's share of the clean training set (drawn with each cell's seed).
    holdout: the share of the reserved set held out from the defense's training (its held-out
      loss and accuracy are recorded per epoch; FP also splits its own training data).
  """
  dataset: str = "mnist5k"
  model: str = "small_cnn"
  model_options: dict[str, int | bool] = dataclasses.field(default_factory=dict)
  attacks: tuple[str, ...] = ("badnets", "blended")
  defenses: tuple[str, ...] = ("ft", "d3")
  seeds: int = 1
  poison_ratio: float = 0.1
  ratios: dict[str, float] = dataclasses.field(default_factory=dict)
  target: int = 0
  train: AttackTrainConfig = AttackTrainConfig()
  defense_epochs: int = 0
  reserved_ratio: float = 0.05
  holdout: float = 0.1

  def __post_init__(self) -> None:
    check_field(bool(self.attacks) and len(set(self.attacks)) == len(self.attacks), "attacks",
                self.attacks, "a non-empty list of distinct attack names")
    check_field(bool(self.defenses) and len(set(self.defenses)) == len(self.defenses), "defenses",
                self.defenses, "a non-empty list of distinct defense names")
    for name in self.defenses:
      defenses.config_type(name)
    unknown = sorted(set(self.ratios) - set(self.attacks))
    check_field(not unknown, "ratios", self.ratios, "overrides for attacks of --attacks only")
    check_field(isinstance(self.seeds, int) and not isinstance(self.seeds, bool) and self.seeds >= 1,
                "seeds", self.seeds, "an integer ≥ 1")
    check_field(isinstance(self.defense_epochs, int) and self.defense_epochs >= 0, "defense_epochs",
                self.defense_epochs, "an integer ≥ 0 (0: no cap)")
    self.reserved(0)

  def attack_run(self, attack: str, seed: int) -> AttackRun:
    return AttackRun(dataset=self.dataset, model=self.model, model_options=dict(self.model_options),
                     attack=attack, ratio=self.ratios.get(attack, self.poison_ratio),
                     target=self.target, seed=seed, train=self.train)

  def reserved(self, seed: int) -> ReservedSplit:
    return ReservedSplit(ratio=self.reserved_ratio, holdout=self.holdout, seed=seed)

  def defense_config(self, name: str) -> Any:
    default = defenses.get(name)
    if self.defense_epochs and default.epochs > self.defense_epochs:
      return dataclasses.replace(default, epochs=self.defense_epochs)
    return default


def _finished_or_resume(path: Path, expected: dict, what: str) -> bool | None:
  """True: ``path`` is a finished run with the ``expected`` settings (reuse it); False: an
  interrupted run to resume; None: nothing there yet.

  Raises:
    ValueError: ``path`` holds a run with other settings (the table's output was made with a
      different command).
  """
  stored = None
  if path.exists():
    stored = checkpoint.load_json(checkpoint.verify_run(path), "config.json")
  elif (checkpoint.staging_dir(path) / "config.json").is_file():
    stored = checkpoint.load_json(checkpoint.staging_dir(path), "config.json")
  if stored is None:
    return None
  wanted = json.loads(json.dumps(checkpoint.to_json(expected, "config")))
  if any(stored.get(key) != value for key, value in wanted.items()):
    raise ValueError(f"{path} holds a {what} with other settings than this table's; use another "
                     "--out or the same settings.")
  return path.exists()


def attack_cell(spec: TableSpec, out: Path, attack: str, seed: int, tracking: runs.Tracking
                ) -> runs.LoadedRun:
  """The attack run of (attack, seed): read back when finished, else trained or resumed."""
  run = spec.attack_run(attack, seed)
  path = out / "attacks" / f"{attack}-s{seed}"
  state = _finished_or_resume(path, {"kind": "attack", "attack": run.to_json()}, "attack run")
  if state:
    LOG.info("reusing %s", path)
    return runs.load(path)
  loaded, _ = runs.write_attack(run, path, resume=state is False, tracking=tracking)
  return loaded


def defense_cell(spec: TableSpec, out: Path, source: runs.LoadedRun, attack: str, name: str,
                 seed: int, tracking: runs.Tracking) -> dict:
  """The table row of defense ``name`` on the attack run ``source`` (read back when finished)."""
  config = spec.defense_config(name)
  split = spec.reserved(seed)
  path = out / "defenses" / f"{attack}-s{seed}" / name
  expected = {"kind": "defense", "defense": {"name": name, "config": dataclasses.asdict(config)},
              "reserved": dataclasses.asdict(split)}
  state = _finished_or_resume(path, expected, "defense run")
  if state:
    LOG.info("reusing %s", path)
    return checkpoint.load_json(path, "metrics.json")
  _, (_, row) = runs.write_defense(source, name, config, split, path, resume=state is False,
                                   tracking=tracking)
  return row


def run_table(spec: TableSpec, out: str | Path, *, progress: bool = True) -> dict:
  """Runs (or continues) the table into ``out``; returns ``{"runs": [...], "cells": [...]}`` and
  writes table.csv, table.json, der.png and table.txt there."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tracking = runs.Tracking(eval_every=0, progress=progress)
  rows = []
  for seed in range(spec.seeds):
    for attack in spec.attacks:
      source = attack_cell(spec, out, attack, seed, tracking)
      rows.append({"seed": seed, "attack": attack, "defense": "none",
                   **{k: source.metrics[k] for k in ("acc", "asr", "ra")}, "der": None})
      for name in spec.defenses:
        row = defense_cell(spec, out, source, attack, name, seed, tracking)
        rows.append({"seed": seed, "attack": attack, "defense": name,
                     **{k: row[k] for k in ("acc", "asr", "ra", "der")}})
  result = {"spec": checkpoint.to_json(dataclasses.asdict(spec), "spec"), "runs": rows,
            "cells": summarize(rows, spec.attacks, ("none",) + spec.defenses)}
  write_outputs(result, spec, out)
  return result


def summarize(rows: list[dict], attacks: tuple[str, ...], columns: tuple[str, ...]) -> list[dict]:
  """Mean and std over seeds of each (attack, defense) cell, and an "average" row per defense
  (the mean over attacks of the per-seed values, then mean ± std over seeds)."""
  cells = []
  for attack in attacks + ("average",):
    for name in columns:
      chosen = [r for r in rows if r["defense"] == name and (attack == "average" or r["attack"] == attack)]
      cell = {"attack": attack, "defense": name}
      for metric in ("acc", "asr", "ra", "der"):
        by_seed: dict[int, list[float]] = {}
        for r in chosen:
          if r[metric] is not None:
            by_seed.setdefault(r["seed"], []).append(r[metric])
        values = [float(np.mean(v)) for v in by_seed.values()]
        cell[metric] = float(np.mean(values)) if values else None
        cell[f"{metric}_std"] = float(np.std(values)) if values else None
      cells.append(cell)
  return cells


def _ranks(values: list[float | None], higher_is_better: bool) -> list[str]:
  """'*' for the best, '+' for the second best, '' otherwise (ties share the mark)."""
  known = sorted({v for v in values if v is not None}, reverse=higher_is_better)
  marks = {v: mark for v, mark in zip(known[:2], ("*", "+"))}
  return [marks.get(v, "") if v is not None else "" for v in values]


def format_table(cells: list[dict], attacks: tuple[str, ...], names: tuple[str, ...],
                 seeds: int) -> str:
  """The Table-1 layout: attacks (and the average) down, defenses across with ACC/ASR/DER in
  percent; marks compare the defenses of a row (ACC and DER higher, ASR lower is better)."""
  def text(cell, metric):
    value = cell[metric]
    if value is None:
      return "-"
    return f"{100 * value:.1f}" + (f"±{100 * cell[metric + '_std']:.1f}" if seeds > 1 else "")

  columns = ("none",) + names
  width = 14 if seeds > 1 else 7
  header = f"{'':<10}" + "".join(f"{'No defense' if n == 'none' else n:^{3 * (width + 1)}}|" for n in columns)
  sub = f"{'attack':<10}" + "".join("".join(f"{m.upper():>{width}} " for m in METRICS) + "|"
                                     for _ in columns)
  lines = [header, sub, "-" * len(sub)]
  for attack in attacks + ("average",):
    row = {c["defense"]: c for c in cells if c["attack"] == attack}
    marks = {m: dict(zip(names, _ranks([row[n][m] for n in names], m != "asr"))) for m in METRICS}
    line = f"{attack:<10}"
    for name in columns:
      line += "".join(f"{text(row[name], m) + marks[m].get(name, ''):>{width}} " for m in METRICS) + "|"
    lines.append(line)
  return "\n".join(lines)


def heatmap(cells: list[dict], attacks: tuple[str, ...], names: tuple[str, ...], path: Path) -> None:
  """A PNG heat map of the mean DER (attacks and the average × defenses), values written in."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = attacks + ("average",)
  grid = np.array([[next(c["der"] for c in cells if c["attack"] == a and c["defense"] == n)
                    for n in names] for a in rows], dtype=float)
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.5 * len(rows)))
  image = ax.imshow(100 * grid, cmap="viridis", vmin=50, vmax=100, aspect="auto")
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_yticks(range(len(rows)), rows)
  for i in range(len(rows)):
    for j in range(len(names)):
      ax.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
  fig.colorbar(image, ax=ax, label="DER (%)")
  ax.set_title("DER of each defense (mean over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(result: dict, spec: TableSpec, out: Path) -> None:
  """table.csv (one row per run), table.json, table.txt and der.png."""
  with (out / "table.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["attack", "defense", "seed", "acc", "asr", "ra", "der"])
    writer.writeheader()
    writer.writerows(result["runs"])
  checkpoint.save_json(out / "table.json", result)
  (out / "table.txt").write_text(format_table(result["cells"], spec.attacks, spec.defenses,
                                              spec.seeds) + "\n")
  heatmap(result["cells"], spec.attacks, spec.defenses, out / "der.png")
