"""Why D3 leaves the Blended backdoor in the demo's small CNN: one Blended model, D3 variants.

A diagnosis, not model selection: it reads the test set to *report* what each variant does; the
demo's settings were fixed beforehand (README) and are not chosen from this table.

Run:  .venv/bin/python experiments/why/blended_probe.py [--out experiments/results/blended_probe.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from d3jax.workflows import demo, pipeline

BASE = demo.DEFENSES["d3"]
VARIANTS = {
    "paper preset (demo)": (BASE, 0.05),
    "300 epochs": (dataclasses.replace(BASE, epochs=300), 0.05),
    "reserved 20% (800 images)": (BASE, 0.20),
    "λ = 0.5 (official)": (dataclasses.replace(BASE, lmd=0.5), 0.05),
    "ε = 0.5": (dataclasses.replace(BASE, eps=0.5), 0.05),
    "warm-up far (−W0)": (dataclasses.replace(BASE, warm_up="far"), 0.05),
    "select conv4 + head": (dataclasses.replace(BASE, select="(conv4|linear)/kernel"), 0.05),
    "select every kernel": (dataclasses.replace(BASE, select=".*kernel"), 0.05),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/blended_probe.md")
  args = parser.parse_args()
  start = time.perf_counter()
  backdoored = pipeline.attack(dataclasses.replace(demo.DEMO_RUN, attack="blended"), progress=False)
  before = backdoored.baseline
  lines = ["| variant | reserved | ACC | ASR | RA | DER | seconds |", "|---|---|---|---|---|---|---|",
           f"| no defense | – | {100 * before.acc:.2f} | {100 * before.asr:.2f} | {100 * before.ra:.2f} | – | – |"]
  for name, (config, ratio) in VARIANTS.items():
    t0 = time.perf_counter()
    row, _, _ = pipeline.defense_row(backdoored, "d3", config, reserved_ratio=ratio, progress=False)
    lines.append(f"| {name} | {ratio:.0%} | {100 * row['acc']:.2f} | {100 * row['asr']:.2f} | "
                 f"{100 * row['ra']:.2f} | {100 * row['der']:.2f} | {time.perf_counter() - t0:.0f} |")
    print(lines[-1], flush=True)
  table = "\n".join(lines)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(
      "# D3 variants on the demo's Blended model (mnist5k, small CNN width 16)\n\n"
      f"Command: `.venv/bin/python experiments/why/blended_probe.py`; total {time.perf_counter() - start:.0f} s "
      "on the 2-core CPU.\n\n" + table + "\n")
  print(table)


if __name__ == "__main__":
  main()
