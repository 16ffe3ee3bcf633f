"""The configurations of a sweep run trained one by one: wall time and agreement with the sweep.

Reads the sweep run written by `d3jax sweep` (its grid, seeds, defense config and reserved split),
trains every configuration and seed alone with `d3jax.defenses.defend` on the same data and keys,
measures each, and writes a markdown report: the sweep's table, the sweep's training wall time
beside the one-by-one training wall time, and the largest ACC/ASR difference between the two.

Run:  .venv/bin/python benchmarks/one_by_one.py --attack-run RUN --sweep-run SWEEP \
        --out experiments/results/sweep_grid.md
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import jax
from tqdm import tqdm

from d3jax import defenses
from d3jax.rundirs import checkpoint, runs
from d3jax.workflows.pipeline import ReservedSplit, from_dict
from d3jax.studies.sweep_runs import defense_key


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--attack-run", required=True)
  parser.add_argument("--sweep-run", required=True)
  parser.add_argument("--out", default="experiments/results/sweep_grid.md")
  args = parser.parse_args()
  sweep_dir = checkpoint.verify_run(args.sweep_run)
  config = checkpoint.load_json(sweep_dir, "config.json")
  metrics = checkpoint.load_json(sweep_dir, "metrics.json")
  source = runs.load(args.attack_run)
  if config["attack"] != source.config["attack"]:
    raise SystemExit(f"{args.sweep_run} was not swept on {args.attack_run}.")
  name = config["defense"]["name"]
  base = from_dict(defenses.config_type(name), config["defense"]["config"], "config")
  split = from_dict(ReservedSplit, config["reserved"], "reserved")
  backdoored = source.backdoored
  (images, labels), _ = split.draw(backdoored.dataset)
  grid, seeds = config["grid"], config["seeds"]
  start = time.perf_counter()
  alone = []
  todo = [(values, seed) for values in itertools.product(*grid.values()) for seed in range(seeds)]
  for values, seed in tqdm(todo, desc="one by one"):
    key = defense_key(split) if seeds == 1 else jax.random.fold_in(defense_key(split), seed)
    variables, _ = defenses.defend(name, backdoored.model, backdoored.variables, images, labels,
                                   normalization=backdoored.normalization, key=key,
                                   config=dataclasses.replace(base, **dict(zip(grid, values))),
                                   progress=False)
    alone.append(backdoored.measure(variables))
  alone_s = time.perf_counter() - start
  gaps = {k: max(abs(getattr(a, k) - r[k]) for a, r in zip(alone, metrics["runs"]))
          for k in ("acc", "asr")}
  table = (sweep_dir / "table.txt").read_text()
  text = (f"# {name} grid of {len(todo) // seeds} configurations × {seeds} seed(s) on "
          f"{config['dataset']['source']} ({config['attack']['attack']})\n\n"
          f"Training wall time: sweep (one vmapped program) {metrics['train_wall_time_s']:.0f} s; "
          f"the same {len(todo)} runs one by one {alone_s:.0f} s.\n"
          f"Largest difference sweep vs one by one: ACC {100 * gaps['acc']:.2f} points, "
          f"ASR {100 * gaps['asr']:.2f} points.\n\n```\n{table}```\n\n"
          f"Heat map: {sweep_dir / 'heatmap.png'}\n")
  Path(args.out).write_text(text)
  Path(args.out).with_suffix(".json").write_text(json.dumps(
      {"sweep_train_s": metrics["train_wall_time_s"], "one_by_one_s": alone_s, "gaps": gaps}) + "\n")
  print(text)


if __name__ == "__main__":
  main()
