"""``d3jax demo``: backdoor a small CNN on the embedded MNIST subset with BadNets and Blended,
defend each model with FT and D3, and print a Table-1-style ACC/ASR/RA/DER table.

Settings are the published ones except where this CPU-sized setting needs otherwise (also
stated in the README):

* Attack training: 15 epochs at learning rate 0.05 with a cosine over those 15 epochs, instead of
  BackdoorBench's 100 epochs at 0.01 — 100 epochs do not fit a minutes-long demo. With 8 epochs the
  undefended BadNets ASR depended on the CPU's rounding (92.3% on an Intel Xeon, 88.6% on an AMD
  EPYC); 15 epochs reach 99.9% (BadNets) on an AMD EPYC.
* Defense batch size 32 instead of 256, for FT and D3 alike: the 5% reserved set of mnist5k has
  200 images, so batch 256 would give one step per epoch (100 steps in all), while the paper's
  2,500 images at batch 256 give 10 steps per epoch; batch 32 gives 7. Everything else is the
  paper preset of D3 (λ = 10, ε = 0.1, Frobenius, head ``linear/kernel``, random warm-up,
  100 epochs, lr 0.01) and the official FT configuration.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from d3jax.workflows import pipeline
from d3jax.attacks.training import AttackTrainConfig
from d3jax.defenses import D3Config, FTConfig

ATTACKS = ("badnets", "blended")
DEMO_RUN = pipeline.AttackRun(
    dataset="mnist5k", model="small_cnn", model_options={"width": 16}, ratio=0.1, target=0,
    train=AttackTrainConfig(epochs=15, learning_rate=0.05, cosine_t_max=15))
DEFENSES = {"ft": FTConfig(batch_size=32), "d3": D3Config.preset("paper", batch_size=32)}
RESERVED_RATIO = 0.05


def run_demo(out: str | Path, *, progress: bool = True) -> list[dict]:
  """Runs the demo, prints the table and writes ``out/results.json``; returns the rows."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  rows = []
  for attack_name in ATTACKS:
    run = dataclasses.replace(DEMO_RUN, attack=attack_name)
    backdoored = pipeline.attack(run, progress=progress)
    rows.append(pipeline.table_row(attack_name, "none", backdoored.baseline))
    print(f"[{time.perf_counter() - start:5.0f}s] {attack_name}: backdoored model trained", flush=True)
    for defense_name, config in DEFENSES.items():
      row, _, _ = pipeline.defense_row(backdoored, defense_name, config,
                                       reserved_ratio=RESERVED_RATIO, progress=progress)
      rows.append(row)
      print(f"[{time.perf_counter() - start:5.0f}s] {attack_name}: {defense_name} done", flush=True)
  (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
  print()
  print(pipeline.format_table(rows))
  print(f"\nwall time {time.perf_counter() - start:.0f} s; results in {out / 'results.json'}")
  return rows
