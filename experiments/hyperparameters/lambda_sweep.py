"""D3's λ on the demo's models: one vmapped sweep per attack (d3jax.workflows.sweep), measured afterwards.

A diagnosis of the trade-off, not model selection: the test sets are read only to report each
run; the demo keeps the paper's λ = 10.

Run:  .venv/bin/python experiments/hyperparameters/lambda_sweep.py [--out experiments/results/lambda_sweep.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax

from d3jax import metrics
from d3jax.workflows import demo, pipeline
from d3jax.workflows.sweep import sweep

LAMBDAS = (0.5, 1.0, 2.0, 5.0, 10.0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/lambda_sweep.md")
  args = parser.parse_args()
  lines = ["| attack | λ | ACC | ASR | RA | DER |", "|---|---|---|---|---|---|"]
  timings = []
  for attack_name in demo.ATTACKS:
    backdoored = pipeline.attack(dataclasses.replace(demo.DEMO_RUN, attack=attack_name), progress=False)
    before = backdoored.baseline
    lines.append(f"| {attack_name} | none | {100 * before.acc:.2f} | {100 * before.asr:.2f} | "
                 f"{100 * before.ra:.2f} | – |")
    images, labels = pipeline.reserved_set(backdoored.dataset, demo.RESERVED_RATIO, seed=0)
    start = time.perf_counter()
    defended, log = sweep("d3", backdoored.model, backdoored.variables, images, labels,
                          normalization=backdoored.normalization, key=jax.random.fold_in(jax.random.key(0), 3),
                          grid={"lmd": LAMBDAS}, config=demo.DEFENSES["d3"], progress=False)
    timings.append(f"{attack_name}: {len(LAMBDAS)} runs in {time.perf_counter() - start:.0f} s")
    for lmd, variables in zip(log["hparams"]["lmd"], defended):
      after = backdoored.measure(variables)
      der = metrics.der(before.acc, before.asr, after.acc, after.asr)
      lines.append(f"| {attack_name} | {lmd:g} | {100 * after.acc:.2f} | {100 * after.asr:.2f} | "
                   f"{100 * after.ra:.2f} | {100 * der:.2f} |")
      print(lines[-1], flush=True)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(
      "# D3 λ sweep on the demo's models (mnist5k, small CNN width 16, 5% reserved, batch 32)\n\n"
      "Command: `.venv/bin/python experiments/hyperparameters/lambda_sweep.py` on the 2-core CPU; the λ of one attack "
      "trained by `d3jax.workflows.sweep` as one vmapped program (" + "; ".join(timings) + ").\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
