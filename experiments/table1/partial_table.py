"""Markdown of a `d3jax table` output directory as far as it got (seed 0): the attack rows and
every finished defense cell, '–' for cells not run yet. `d3jax table` itself writes table.txt only
when every cell is done.

Run:  .venv/bin/python experiments/table1/partial_table.py runs/table-mnist5k ft,ft-sam,nft,fst,d3,fp,nc,i-bau
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from d3jax import attacks


def main(root: Path, names: list[str]) -> None:
  finished = {p.name[:-3] for p in (root / "attacks").iterdir() if not p.name.startswith(".")}
  print("| attack | no defense ACC/ASR | " + " | ".join(f"{d} ACC/ASR/DER" for d in names) + " |")
  print("|---" * (len(names) + 2) + "|")
  for attack in (a for a in attacks.names() if a in finished):
    row = json.loads((root / "attacks" / f"{attack}-s0" / "metrics.json").read_text())
    cells = [f"{100 * row['acc']:.1f}/{100 * row['asr']:.1f}"]
    for name in names:
      path = root / "defenses" / f"{attack}-s0" / name / "metrics.json"
      if path.exists():
        cell = json.loads(path.read_text())
        cells.append(f"{100 * cell['acc']:.1f}/{100 * cell['asr']:.1f}/{100 * cell['der']:.1f}")
      else:
        cells.append("–")
    print(f"| {attack} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(Path(sys.argv[1]), sys.argv[2].split(","))
