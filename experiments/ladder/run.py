"""The scale ladder: where does D3 begin to behave as in the paper?

Backdoored PreAct-ResNet18s of increasing width (so of increasing clean accuracy) on the CIFAR-10
subset, the same attack recipe at every width (the one of experiments/results/table_cifar: 20
epochs, SGD lr 0.05 with cosine decay, batch 128, flips, no crop), and on each model the same
reserved set (5% of the training set, seed 0, 20% of it held out) defended by FT, FT-SAM and D3
over a λ grid at ε = 0.1 (one vmapped program, :func:`d3jax.workflows.sweep.sweep`). The grid holds the
paper preset (λ = 10) and the official preset (λ = 0.5): both are D3's published defaults with
only λ changed. The test-free choice (``d3jax.workflows.auto_choice``) picks from the same grid with the
held-out part only; the ASR/ACC of every grid point is recorded for evaluation.

Usage (from the repository root; one process per attack, one core each):
  taskset -c 0 .venv/bin/python experiments/ladder/run.py --attacks badnets &
  taskset -c 1 .venv/bin/python experiments/ladder/run.py --attacks blended &
(widths 2, 4, 8 by default, as run for results/ladder; `--widths 16 32` for the next rungs.)
Every attack at every width is trained first, then the defenses, narrowest model first. Writes
OUT/ladder.json (every measurement; a rerun skips what is there) and, with --report,
OUT/ladder.md and OUT/ladder.png (DER and ASR against the backdoored model's ACC per defense).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import time
from pathlib import Path

import numpy as np

from d3jax.analysis.plotting import pyplot, save
from d3jax.engine import compile_cache
from d3jax.workflows import pipeline
from d3jax.rundirs import runs
from d3jax.attacks.training import AttackTrainConfig
from d3jax.defenses import D3Config, FTConfig
from d3jax.defenses.ft_sam import FTSAMConfig
from d3jax.metrics import der
from d3jax.workflows.auto_choice import DEFAULT_BUDGET, choose, choose_strongest
from d3jax.workflows.sweep import sweep
from d3jax.studies.sweep_runs import defense_key, measure_runs

CIFAR = Path("../shared/data/cifar10_10k_jpegsrc.npz")
TRAIN = AttackTrainConfig(epochs=20, cosine_t_max=20, learning_rate=0.05, crop_padding=0, flip=True)
LAMBDAS = (0.5, 1.0, 10.0)
FIXED = {"ft": FTConfig(), "ft-sam": FTSAMConfig()}
SPLIT = pipeline.ReservedSplit(ratio=0.05, holdout=0.2, seed=0)


def attack_run(out: Path, attack: str, width: int) -> runs.LoadedRun:
  path = out / "runs" / f"w{width}-{attack}"
  if (path / "config.json").exists():
    return runs.load(path)
  run = pipeline.AttackRun(dataset=f"npz:{CIFAR.resolve()}", model="preact_resnet18",
                           model_options={"width": width}, attack=attack, train=TRAIN)
  loaded, _ = runs.write_attack(run, path, tracking=runs.Tracking(eval_every=0, progress=False))
  return loaded


def defend_case(backdoored: pipeline.Backdoored, defense: str, epochs: int) -> dict:
  """One defense (``ft``, ``ft-sam``, or ``d3`` for the whole λ grid) on the case's reserved set."""
  (images, labels), heldout = SPLIT.draw(backdoored.dataset)
  start = time.perf_counter()
  if defense == "d3":
    config = dataclasses.replace(D3Config.preset("paper"), epochs=epochs)
    defended, _ = sweep("d3", backdoored.model, backdoored.variables, images, labels,
                        normalization=backdoored.normalization, key=defense_key(SPLIT),
                        grid={"lmd": list(LAMBDAS)}, config=config, progress=False)
    measured = measure_runs(backdoored, config, defended, heldout, progress=False)
    return {"lmd": list(LAMBDAS), **measured, "wall_s": time.perf_counter() - start}
  config = dataclasses.replace(FIXED[defense], epochs=epochs)
  variables, _ = pipeline.defend_model(backdoored, defense, config, images, labels, seed=0,
                                       progress=False)
  return measured_row(backdoored, variables) | {"wall_s": time.perf_counter() - start}


def measured_row(backdoored: pipeline.Backdoored, variables) -> dict:
  """ACC, ASR, RA of defended ``variables`` and their DER against the backdoored model."""
  measured, before = backdoored.measure(variables), backdoored.baseline
  return {"acc": measured.acc, "asr": measured.asr, "ra": measured.ra,
          "der": der(before.acc, before.asr, measured.acc, measured.asr)}


def columns(results: dict, width: int, attack: str, n_heldout: int) -> dict[str, dict]:
  """ACC/ASR/DER of every reported defense of one case: FT, FT-SAM, the D3 grid's points, and the
  points the two test-free rules choose from the grid (held-out accuracy and distance only)."""
  case = {d: results[f"w{width}/{attack}/{d}"] for d in ("ft", "ft-sam", "d3")
          if f"w{width}/{attack}/{d}" in results}
  out = {d: case[d] for d in ("ft", "ft-sam") if d in case}
  if "d3" in case:
    grid = case["d3"]
    pick = {f"d3 λ={lmd:g}": i for i, lmd in enumerate(grid["lmd"])}
    pick["d3 auto (strongest)"] = choose_strongest(grid["heldout_acc"], grid["lmd"], n_heldout)
    pick["d3 auto (farthest)"] = choose(grid["heldout_acc"], grid["distance"], DEFAULT_BUDGET)
    for name, i in pick.items():
      out[name] = {k: grid[k][i] for k in ("acc", "asr", "der")} | {"lmd": grid["lmd"][i]}
  return out


def report(out: Path, widths: list[int], attacks: list[str]) -> None:
  """ladder.md (one row per model and defense) and ladder.png."""
  results = read_results(out / "ladder.json")
  dataset = runs.load(out / "runs" / f"w{widths[0]}-{attacks[0]}").backdoored.dataset
  _, (_, heldout_labels) = SPLIT.draw(dataset)
  n_heldout = len(heldout_labels)
  rows, series = [], {}
  for attack in attacks:
    for width in widths:
      if f"w{width}/{attack}/none" not in results:
        continue
      none = results[f"w{width}/{attack}/none"]
      cells = columns(results, width, attack, n_heldout)
      rows.append(f"| {attack} | {width} | none | {100 * none['acc']:.1f} | {100 * none['asr']:.1f} | – |")
      rows += [f"| {attack} | {width} | {name}" + (f" → λ={c['lmd']:g}" if "auto" in name else "")
               + f" | {100 * c['acc']:.1f} | {100 * c['asr']:.1f} | {100 * c['der']:.1f} |"
               for name, c in cells.items()]
      for name, c in cells.items():
        series.setdefault((name, attack), []).append((none["acc"], c["acc"], c["asr"], c["der"]))
  rules = []
  for rule in sorted({name for name, _ in series if "auto" in name}):
    points = [p for (name, _), ps in series.items() if name == rule for p in ps]
    _, acc, asr, der_ = (100 * np.mean(v) for v in zip(*points))
    rules.append(f"- {rule}: {len(points)} cases, mean ACC {acc:.1f}, ASR {asr:.1f}, DER {der_:.1f}; "
                 f"ASR above 20% in {sum(p[2] > 0.2 for p in points)}")
  (out / "ladder.md").write_text(
      "| attack | width | defense | ACC | ASR | DER |\n|---|---|---|---|---|---|\n"
      + "\n".join(rows) + f"\n\nHeld-out part of the reserved set: {n_heldout} images.\n\n"
      + "The test-free rules over the cases above:\n" + "\n".join(rules) + "\n")
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  names = list(dict.fromkeys(name for name, _ in series))
  colors = {name: f"C{i}" for i, name in enumerate(names)}
  for (name, attack), points in series.items():
    acc, _, asr, der_ = (100 * np.asarray(v) for v in zip(*points))
    style = dict(color=colors[name], marker="o" if attack == attacks[0] else "s",
                 linestyle="-" if attack == attacks[0] else "--", label=f"{name}, {attack}")
    axes[0].plot(acc, der_, **style)
    axes[1].plot(acc, asr, **style)
  for ax, what in zip(axes, ("DER", "ASR after the defense (%)")):
    ax.set_xlabel("clean ACC of the backdoored model (%)")
    ax.set_ylabel(what)
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle("PreAct-ResNet18 widths " + ", ".join(map(str, widths)) + " on the CIFAR-10 subset")
  save(fig, out / "ladder.png")


def read_results(path: Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def record(path: Path, key: str, value: dict) -> None:
  """Adds one entry to the shared JSON (two processes write it; a lock keeps both entries)."""
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    results = read_results(path)
    results[key] = value
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("experiments/results/ladder"))
  parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
  parser.add_argument("--defenses", nargs="+", default=["ft", "ft-sam", "d3"])
  parser.add_argument("--epochs", type=int, default=100, help="every defense's epochs")
  parser.add_argument("--report", action="store_true", help="write ladder.md and ladder.png from "
                      "the JSON and stop")
  args = parser.parse_args()
  if args.report:
    report(args.out, args.widths, args.attacks)
    return
  compile_cache.enable()
  args.out.mkdir(parents=True, exist_ok=True)
  results_path = args.out / "ladder.json"
  models = {}
  for width in args.widths:
    for attack in args.attacks:
      start = time.perf_counter()
      loaded = attack_run(args.out, attack, width)
      models[width, attack] = loaded.backdoored
      key = f"w{width}/{attack}/none"
      if key not in read_results(results_path):
        record(results_path, key, {**loaded.backdoored.baseline._asdict(),
                                   "wall_s": time.perf_counter() - start})
      print(f"attack w{width} {attack}: {loaded.backdoored.baseline}", flush=True)
  for width in args.widths:
    for attack in args.attacks:
      for defense in args.defenses:
        key = f"w{width}/{attack}/{defense}"
        if key in read_results(results_path):
          continue
        result = defend_case(models[width, attack], defense, args.epochs)
        record(results_path, key, result)
        print(f"{key}: ACC {np.round(100 * np.asarray(result['acc']), 1)} "
              f"ASR {np.round(100 * np.asarray(result['asr']), 1)} ({result['wall_s']:.0f} s)",
              flush=True)


if __name__ == "__main__":
  main()
