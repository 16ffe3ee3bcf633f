"""Both test-free rules of d3jax.auto_choice applied to recorded grids (no training).

Reads the per-candidate records that experiments/auto/auto_choice.py writes (held-out accuracy,
distance, and for evaluation ACC/ASR/DER of every grid point) and reports, per file, the mean
ACC/ASR/DER of the point each rule picks and its failures (ASR above 20% or DER more than 5 points
below the grid's best). This is how the ``strongest`` rule was designed on the mnist5k and digits
records; the CIFAR-10 cases it is judged on are in experiments/ladder.

Run:  .venv/bin/python experiments/auto/rules_on_records.py \\
          experiments/results/auto_choice_mnist5k.json:40 experiments/results/auto_choice_digits.json:14
(each file with the number of held-out images its cases used).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from auto_choice import is_failure  # the sibling script (its folder is on sys.path)
from d3jax.workflows.auto_choice import DEFAULT_BUDGET, choose, choose_strongest


def picks(case: dict, n_heldout: int) -> dict[str, int]:
  lmd = [point["lmd"] for point in case["points"]]
  return {"farthest": choose(case["heldout_acc"], case["distance"], DEFAULT_BUDGET),
          "strongest": choose_strongest(case["heldout_acc"], lmd, n_heldout)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("records", nargs="+", help="PATH:N_HELDOUT")
  args = parser.parse_args()
  print("| records | rule | cases | ACC | ASR | DER | failures |\n|---|---|---|---|---|---|---|")
  for spec in args.records:
    path, n_heldout = spec.rsplit(":", 1)
    cases = json.loads(open(path).read())
    chosen = [picks(case, int(n_heldout)) for case in cases]
    for rule in ("farthest", "strongest"):
      index = [c[rule] for c in chosen]
      mean = {k: 100 * np.mean([case[k][i] for case, i in zip(cases, index)])
              for k in ("acc", "asr", "der")}
      failures = sum(is_failure(case["asr"][i], case["der"][i], max(case["der"]))
                     for case, i in zip(cases, index))
      print(f"| {path} | {rule} | {len(cases)} | {mean['acc']:.1f} | {mean['asr']:.1f} | "
            f"{mean['der']:.1f} | {failures} |")


if __name__ == "__main__":
  main()
