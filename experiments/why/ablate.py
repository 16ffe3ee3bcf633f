"""Why does D3 fail on the ladder's Blended models? One-factor ablations of D3 on those cases.

The failing cells of experiments/results/ladder are Blended at widths 4 and 8 (ASR after D3 λ = 1:
39.8% and 86.3%; λ = 10: 58.3% and 98.6%). On the same backdoored models (the ladder's attack
runs, so run the ladder first) this script changes one thing at a time from a base D3 setting —
the paper preset with λ = 1 (the grid's best ASR on both cells), ε = 0.1, 100 epochs, the head
kernel selected, the ``random`` warm-up, the ladder's reserved set (5%, seed 0, 20% held out):

- ``select``: the head and the last residual block's convolutions; the head and all of layer 4
  (both blocks and the shortcut); the paper's §4.1 selects "the linear layers", which in a
  PreAct-ResNet18 is the head alone (the base).
- ``warm_up``: ``near`` (start at the backdoored weights) and ``far`` (start at their negation)
  instead of ``random``, the official code's alternatives.
- reserved size: 1% and 10% of the training set (the supplement's Table 3 range) instead of 5%.

The base is run here too (a single run, not the ladder's vmapped grid point, so the comparison is
between runs of one program shape). ``--seeds`` repeats variants with other defense seeds (warm-up
draw, batch order) on the same reserved set, so a difference can be set against the seed spread.
Writes OUT/ablate.json (a rerun skips what is there) and, with --report, OUT/ablate.md. The attack
run is the ladder's (trained here with the ladder's recipe when absent). Usage (one case per core):
  taskset -c 0 .venv/bin/python experiments/why/ablate.py --width 4
  taskset -c 1 .venv/bin/python experiments/why/ablate.py --width 8
  taskset -c 1 .venv/bin/python experiments/why/ablate.py --width 4 --seeds 1 2 \
      --variants base "select head + layer4"
  .venv/bin/python experiments/why/ablate.py --report
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ladder"))
import run as ladder  # noqa: E402  (the sibling experiment: its attack runs, split and JSON)

from d3jax.defenses import D3Config  # noqa: E402
from d3jax.engine import compile_cache  # noqa: E402
from d3jax.workflows import pipeline  # noqa: E402

BASE = dataclasses.replace(D3Config.preset("paper"), lmd=1.0)
VARIANTS: dict[str, tuple[dict, float]] = {  # name: (D3Config overrides, reserved ratio)
    "base": ({}, 0.05),
    "select head + layer4_1 convs": ({"select": "(layer4_1/conv[12]|linear)/kernel"}, 0.05),
    "select head + layer4": ({"select": "(layer4_[01]/(conv[12]|shortcut)|linear)/kernel"}, 0.05),
    "warm_up near": ({"warm_up": "near"}, 0.05),
    "warm_up far": ({"warm_up": "far"}, 0.05),
    "reserved 1%": ({}, 0.01),
    "reserved 10%": ({}, 0.10),
}


def run_key(case: str, name: str, seed: int) -> str:
  """The JSON key of one run; seed 0 keeps the key of the first (seedless) runs."""
  return f"{case}/{name}" + (f" @ seed {seed}" if seed else "")


def parse_key(key: str) -> tuple[str, str, int]:
  case, rest = key.split("/", 1)
  name, _, seed = rest.partition(" @ seed ")
  return case, name, int(seed or 0)


def report_order(key: str) -> tuple[str, int, int]:
  case, name, seed = parse_key(key)
  return case, list(VARIANTS).index(name), seed


def run_variant(backdoored: pipeline.Backdoored, name: str, seed: int) -> dict:
  overrides, ratio = VARIANTS[name]
  split = dataclasses.replace(ladder.SPLIT, ratio=ratio)
  (images, labels), (held_images, held_labels) = split.draw(backdoored.dataset)
  start = time.perf_counter()
  variables, _ = pipeline.defend_model(backdoored, "d3", dataclasses.replace(BASE, **overrides),
                                       images, labels, seed=seed, progress=False)
  return ladder.measured_row(backdoored, variables) | {
      "heldout_acc": pipeline.accuracy_on(backdoored, variables, held_images, held_labels),
      "reserved": len(labels), "wall_s": time.perf_counter() - start}


def report(out: Path) -> None:
  results = ladder.read_results(out / "ablate.json")
  rows = []
  for key in sorted(results, key=report_order):
    r = results[key]
    case, name, seed = parse_key(key)
    rows.append(f"| {case} | {name} | {seed} | {r['reserved']} | {100 * r['acc']:.1f} "
                f"| {100 * r['asr']:.1f} | {100 * r['ra']:.1f} | {100 * r['der']:.1f} "
                f"| {100 * r['heldout_acc']:.1f} | {r['wall_s']:.0f} |")
  groups: dict[tuple[str, str], list[dict]] = {}
  for key in sorted(results, key=report_order):
    case, name, _ = parse_key(key)
    groups.setdefault((case, name), []).append(results[key])
  spread = []
  for (case, name), runs_ in groups.items():
    if len(runs_) > 1:
      cells = [f"{100 * np.mean([r[m] for r in runs_]):.1f} ± "
               f"{100 * np.std([r[m] for r in runs_], ddof=1):.1f}" for m in ("acc", "asr", "der")]
      spread.append(f"| {case} | {name} | {len(runs_)} | " + " | ".join(cells) + " |")
  summary = ("\n\nOver defense seeds (same reserved set; mean ± sample sd):\n\n| case | variant "
             "| seeds | ACC | ASR | DER |\n|---|---|---|---|---|---|\n" + "\n".join(spread)
             if spread else "")
  (out / "ablate.md").write_text(
      "D3 (paper preset, λ = 1, ε = 0.1, 100 epochs) on the ladder's Blended models, one factor "
      "changed per row.\n\n| case | variant | seed | reserved (train part) | ACC | ASR | RA | DER "
      "| held-out ACC | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
      + summary + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ladder", type=Path, default=Path("experiments/results/ladder"))
  parser.add_argument("--out", type=Path, default=Path("experiments/results/why"))
  parser.add_argument("--width", type=int, default=4)
  parser.add_argument("--attack", default="blended")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="defense seeds")
  parser.add_argument("--report", action="store_true", help="write ablate.md from the JSON and stop")
  args = parser.parse_args()
  if args.report:
    report(args.out)
    return
  compile_cache.enable()
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "ablate.json"
  backdoored = ladder.attack_run(args.ladder, args.attack, args.width).backdoored
  for name, seed in [(name, seed) for seed in args.seeds for name in args.variants]:
    key = run_key(f"w{args.width}-{args.attack}", name, seed)
    if key in ladder.read_results(path):
      continue
    result = run_variant(backdoored, name, seed)
    ladder.record(path, key, result)
    print(f"{key}: ACC {100 * result['acc']:.1f} ASR {100 * result['asr']:.1f} "
          f"({result['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
