"""The trigger gallery of trained attack runs: clean | poisoned | magnified residual, read from each
run's stored backdoor test set. For attacks whose trigger is trained with the model (Input-aware's
generators) or that share another attack's trigger (the adaptive attack) this is the trigger the
model was trained against; `experiments/attacks/attack_gallery.py` shows the fixed triggers.

Run from the repository root:
  .venv/bin/python experiments/attacks/run_gallery.py runs/table-mnist5k/attacks/{input_aware,adaptive}-s0 \
      --out experiments/results/attack_gallery_trained.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from d3jax.rundirs import runs
from d3jax.attacks.gallery import pair_row, write_rows


def run_row(run_dir: str, count: int) -> tuple[str, np.ndarray]:
  """The gallery row of an attack run (:meth:`d3jax.workflows.pipeline.Backdoored.gallery_pairs`)."""
  backdoored = runs.load(run_dir).backdoored
  return pair_row(backdoored.run.attack, *backdoored.gallery_pairs(count))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="attack run directories")
  parser.add_argument("--out", default="experiments/results/attack_gallery_trained.png")
  parser.add_argument("--images", type=int, default=4)
  args = parser.parse_args()
  rows = [run_row(run_dir, args.images) for run_dir in args.runs]
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  write_rows(rows, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
