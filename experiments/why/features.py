"""A hypothesis test: does D3 fail where triggered features sit inside the target class's features?

Hypothesis (written and committed before this script was first run): D3 with the paper's
selection moves the head only; it removes a backdoor when the triggered inputs' penultimate
features occupy a region of their own, so the head can be pushed away from its backdoored value
and stop mapping that region to the target while the target class's clean images, elsewhere, stay
correct. Where the trigger's features lie among the target class's clean features no head can
separate them, and D3 must either keep the backdoor or give up target-class accuracy.
Prediction on the ladder's models (experiments/results/ladder: D3 removed BadNets at widths 2, 4
and 8 at λ = 0.5, and Blended only at width 2): triggered-vs-target separability is near 1 for
BadNets at every width and for Blended at width 2, and clearly lower for Blended at widths 4 and
8. If Blended's separability at widths 4 and 8 is as high as BadNets', the hypothesis is wrong.

Measured per backdoored model (eval mode, test split, which no defense sees), on P = the
triggered test images, T = the clean test images of the target class, and C = the clean test
images of the other classes:
- separability: two-fold held-out accuracy of a logistic regression telling P from T (an equal
  number of each, features standardised); 0.5 = indistinguishable, 1 = linearly separable;
- centroid ratio: ‖mean(P) − mean(T)‖ over the mean distance of T's features to mean(T) (below 1:
  the triggered centroid lies inside the target cluster's typical radius);
- nearest-centroid share: the fraction of P whose nearest clean-class centroid (over the ten
  classes' clean test features) is the target's;
- P's distance to mean(T) against C's distance to mean(T), both over T's radius.
Writes OUT/features.json and OUT/features.md. Usage:
  .venv/bin/python experiments/why/features.py
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from d3jax.analysis.data import paired, subsample
from d3jax.analysis.probe import penultimate
from d3jax.rundirs import runs


def measure(backdoored) -> dict:
  data = paired(backdoored)
  target = int(backdoored.run.target)
  dataset = backdoored.dataset

  def features(images: np.ndarray) -> np.ndarray:
    return penultimate(backdoored.model, backdoored.variables, images, backdoored.normalization)

  clean_all = features(dataset.x_test)
  poisoned = features(data.poisoned)
  target_clean = clean_all[dataset.y_test == target]
  others = clean_all[dataset.y_test != target]
  n = min(len(target_clean), len(poisoned))
  p_rows = subsample(n, len(poisoned), seed=0)
  t_rows = subsample(n, len(target_clean), seed=1)
  x = np.concatenate([poisoned[p_rows], target_clean[t_rows]])
  y = np.concatenate([np.ones(n), np.zeros(n)])
  probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
  separability = float(np.mean(cross_val_score(probe, x, y, cv=2)))
  centre = target_clean.mean(0)
  radius = float(np.mean(np.linalg.norm(target_clean - centre, axis=1)))
  centroids = np.stack([clean_all[dataset.y_test == c].mean(0) for c in range(int(dataset.y_test.max()) + 1)])
  nearest = np.argmin(np.linalg.norm(poisoned[:, None] - centroids[None], axis=-1), axis=1)
  return {"separability": separability,
          "centroid_ratio": float(np.linalg.norm(poisoned.mean(0) - centre)) / radius,
          "nearest_centroid_target": float(np.mean(nearest == target)),
          "poisoned_to_target": float(np.mean(np.linalg.norm(poisoned - centre, axis=1))) / radius,
          "others_to_target": float(np.mean(np.linalg.norm(others - centre, axis=1))) / radius,
          "n_per_side": int(n)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ladder", type=Path, default=Path("experiments/results/ladder"))
  parser.add_argument("--out", type=Path, default=Path("experiments/results/why"))
  parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  ladder = json.loads((args.ladder / "ladder.json").read_text())
  results, rows = {}, []
  for attack in args.attacks:
    for width in args.widths:
      case = f"w{width}-{attack}"
      result = measure(runs.load(args.ladder / "runs" / case).backdoored)
      asr = {lmd: ladder[f"w{width}/{attack}/d3"]["asr"][i]
             for i, lmd in enumerate(ladder[f"w{width}/{attack}/d3"]["lmd"])}
      results[case] = result | {"d3_asr": asr}
      rows.append(f"| {attack} | {width} | {result['separability']:.3f} | {result['centroid_ratio']:.2f} "
                  f"| {100 * result['nearest_centroid_target']:.1f} | {result['poisoned_to_target']:.2f} "
                  f"| {result['others_to_target']:.2f} | "
                  + " / ".join(f"{100 * a:.1f}" for a in asr.values()) + " |")
      print(case, result, flush=True)
  (args.out / "features.json").write_text(json.dumps(results, indent=1) + "\n")
  lmds = " / ".join(f"{lmd:g}" for lmd in ladder[f"w{args.widths[0]}/{args.attacks[0]}/d3"]["lmd"])
  (args.out / "features.md").write_text(
      "Penultimate features of the ladder's backdoored models (test split): triggered images P, "
      "target-class clean images T, other clean images C.\n\n"
      "| attack | width | P-vs-T separability | centroid ratio | P nearest to target centroid (%) "
      f"| P→mean(T) / radius | C→mean(T) / radius | D3 ASR at λ = {lmds} (%) |\n"
      "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
