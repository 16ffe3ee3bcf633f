"""How well the test-free rule (d3jax.auto) chooses D3's λ and ε.

For every attack, dataset and seed: train the backdoored model (the demo's recipe), draw the
reserved set (5%) with a held-out part, train the whole λ × ε grid of the paper's Tables 6–7 as
one vmapped program, and measure every configuration twice — what the defender sees (held-out
accuracy, weight distance) and, for evaluation only, ACC/ASR/DER on the test sets. The rule
chooses from the first; the table puts its choice beside the grid's best in hindsight (highest
DER) and the paper's default (λ = 10, ε = 0.1), as mean ± std over seeds, for several budgets.
Rows where the chosen configuration leaves ASR above 20% or loses more than 5 DER points to the
best are listed as failures.

Run (hours on a 2-core CPU; minutes on a GPU):
  .venv/bin/python experiments/auto/auto_choice.py --out experiments/results/auto_choice.md
Smoke test:  ... --datasets digits --attacks badnets --seeds 1 --epochs 1 --attack-epochs 1 --grid lmd=1,10 eps=0,0.5

--attack-runs DIR takes the backdoored models from a `d3jax table` output (DIR/attacks/<attack>-s<seed>,
e.g. the Table 1 runs) instead of training them with the demo's recipe; --extend keeps the cases
already in the JSON beside --out and runs only the missing ones (an interrupted run continues).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from d3jax.workflows import demo, pipeline
from d3jax.rundirs import runs
from d3jax.defenses import D3Config
from d3jax.workflows.auto_choice import choose
from d3jax.workflows.sweep import parse_grid, sweep
from d3jax.studies.sweep_runs import defense_key, measure_runs

PAPER_DEFAULT = {"lmd": 10.0, "eps": 0.1}
# The attacks run by default, with their run settings: SIG is clean-label (its default label mode),
# so it can poison at most the target class (~10% of the data), so it poisons 5% here. The
# pipeline trains every registered attack (`--attacks lf ssba trojannn wanet adaptive` too); LF
# and TrojanNN then train a clean model first to craft against.
ATTACKS = {"badnets": {}, "blended": {}, "sig": {"ratio": 0.05}}


def backdoored_model(dataset: str, attack: str, seed: int, args: argparse.Namespace
                     ) -> pipeline.Backdoored:
  """The backdoored model of a case: read from --attack-runs, else trained with the demo's recipe."""
  if args.attack_runs:
    loaded = runs.load(Path(args.attack_runs) / "attacks" / f"{attack}-s{seed}")
    if loaded.backdoored.run.dataset != dataset:
      raise SystemExit(f"--attack-runs holds {loaded.backdoored.run.dataset} runs, not {dataset}")
    return loaded.backdoored
  # On 16×16 digits a 4-pixel crop often cuts the BadNets patch away; pad by 1 there.
  padding = 1 if dataset == "digits" else demo.DEMO_RUN.train.crop_padding
  train = dataclasses.replace(demo.DEMO_RUN.train, epochs=args.attack_epochs,
                              cosine_t_max=args.attack_epochs, crop_padding=padding)
  run = dataclasses.replace(demo.DEMO_RUN, dataset=dataset, attack=attack, seed=seed, train=train,
                            **ATTACKS.get(attack, {}))
  return pipeline.attack(run, progress=False)


def one_case(dataset: str, attack: str, seed: int, args: argparse.Namespace) -> dict:
  """Every configuration of the grid on one backdoored model: per-config measurements."""
  padding = 1 if dataset == "digits" else demo.DEMO_RUN.train.crop_padding
  backdoored = backdoored_model(dataset, attack, seed, args)
  split = pipeline.ReservedSplit(ratio=args.reserved, holdout=args.holdout, seed=seed)
  (images, labels), heldout = split.draw(backdoored.dataset)
  config = D3Config(epochs=args.epochs, batch_size=32, crop_padding=padding)
  start = time.perf_counter()
  defended, log = sweep("d3", backdoored.model, backdoored.variables, images, labels,
                        normalization=backdoored.normalization, key=defense_key(split),
                        grid=args.grid, config=config, progress=not args.quiet)
  measured = measure_runs(backdoored, config, defended, heldout, not args.quiet)
  points = [dict(zip(args.grid, values)) for values in itertools.product(*args.grid.values())]
  return {"dataset": dataset, "attack": attack, "seed": seed, "points": points,
          "baseline": backdoored.baseline._asdict(), "sweep_s": time.perf_counter() - start,
          **measured}


def is_failure(asr: float, der: float, best_der: float) -> bool:
  """The failure criterion of the reports: ASR above 20% or DER more than 5 points below the best."""
  return asr > 0.2 or best_der - der > 0.05


def summarise(case: dict, budget: float) -> dict:
  """The chosen, best-in-hindsight and paper-default configurations of one case."""
  chosen = choose(case["heldout_acc"], case["distance"], budget)
  best = int(np.argmax(case["der"]))
  default = next((i for i, p in enumerate(case["points"]) if p == PAPER_DEFAULT), None)
  pick = {"chosen": chosen, "best": best, "default": default}
  return {name: None if i is None else {**case["points"][i], **{k: case[k][i] for k in
                                                                 ("acc", "asr", "der")}}
          for name, i in pick.items()}


def _cell(values: list[float]) -> str:
  values = 100 * np.asarray(values)
  return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def report(cases: list[dict], budgets: list[float]) -> str:
  lines = ["| dataset | attack | seeds | budget | chosen ACC | chosen ASR | chosen DER | best ACC "
           "| best ASR | best DER | λ=10,ε=0.1 ACC | ASR | DER |", "|" + "---|" * 13]
  failures = []
  for budget in budgets:
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
      summary = summarise(case, budget)
      groups.setdefault((case["dataset"], case["attack"]), []).append(summary)
      chosen, best = summary["chosen"], summary["best"]
      if is_failure(chosen["asr"], chosen["der"], best["der"]):
        failures.append(f"- {case['dataset']} {case['attack']} seed {case['seed']} budget {budget}: "
                        f"chose λ={chosen['lmd']:g}, ε={chosen['eps']:g} (ACC {100 * chosen['acc']:.1f}, "
                        f"ASR {100 * chosen['asr']:.1f}); best λ={best['lmd']:g}, ε={best['eps']:g} "
                        f"(ACC {100 * best['acc']:.1f}, ASR {100 * best['asr']:.1f})")
    for (dataset, attack), summaries in groups.items():
      cells = [_cell([s[which][k] for s in summaries]) for which in ("chosen", "best")
               for k in ("acc", "asr", "der")]
      defaults = [s["default"] for s in summaries if s["default"] is not None]
      cells += [_cell([d[k] for d in defaults]) if defaults else "—" for k in ("acc", "asr", "der")]
      lines.append(f"| {dataset} | {attack} | {len(summaries)} | {budget:g} | " + " | ".join(cells)
                   + " |")
  lines += ["", f"Failures (chosen ASR > 20% or DER more than 5 points below the best): "
            f"{len(failures)}", *failures]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/auto_choice.md")
  parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
  parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--grid", nargs="+", default=["lmd=1,10,20,30,40", "eps=0,0.1,0.2,0.3,0.4,0.5"])
  parser.add_argument("--budgets", nargs="+", type=float, default=[0.0, 0.02, 0.05])
  parser.add_argument("--epochs", type=int, default=100, help="D3 epochs (the paper's 100)")
  parser.add_argument("--attack-epochs", type=int, default=demo.DEMO_RUN.train.epochs)
  parser.add_argument("--reserved", type=float, default=0.05)
  parser.add_argument("--holdout", type=float, default=0.2)
  parser.add_argument("--attack-runs", help="a `d3jax table` output to take the attack models from")
  parser.add_argument("--extend", action="store_true", help="keep the cases of the JSON beside --out")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args()
  args.grid = parse_grid(args.grid)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  cases = json.loads(out.with_suffix(".json").read_text()) if args.extend else []
  done = {(case["dataset"], case["attack"], case["seed"]) for case in cases}
  start = time.perf_counter()
  for dataset in args.datasets:
    for attack in args.attacks:
      for seed in range(args.seeds):
        if (dataset, attack, seed) in done:
          continue
        cases.append({**one_case(dataset, attack, seed, args), "command": " ".join(sys.argv)})
        print(f"[{time.perf_counter() - start:6.0f}s] {dataset} {attack} seed {seed}", flush=True)
        write(out, cases, args, time.perf_counter() - start)  # an interrupted run keeps its cases
  print(out.read_text())


def write(out: Path, cases: list[dict], args: argparse.Namespace, wall_s: float) -> None:
  out.with_suffix(".json").write_text(json.dumps(cases, indent=1) + "\n")
  commands = dict.fromkeys(case.get("command", " ".join(sys.argv)) for case in cases)
  header = "\n".join(f"- `{command}`" for command in commands)
  out.write_text(f"# Test-free choice of λ and ε vs the grid's best in hindsight\n\n{header}\n\n"
                 f"Grid {args.grid}; D3 {args.epochs} epochs; reserved {args.reserved:g} with "
                 f"{args.holdout:g} held out; {len(cases)} cases; wall time of the last invocation "
                 f"{wall_s:.0f} s (each case's grid time is `sweep_s` in the JSON).\n\n"
                 + report(cases, args.budgets) + "\n")


if __name__ == "__main__":
  main()
