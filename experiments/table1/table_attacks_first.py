"""Train (or reuse) every attack run of a `d3jax table` output first, then run the table on a
subset of the attacks: on a 2-core CPU the attack rows (ACC/ASR/RA after backdoor training) of
every attack fit a session, the defenses of all of them do not.

Run:  .venv/bin/python experiments/table1/table_attacks_first.py --out runs/table-mnist5k \
        --all-attacks badnets blended sig ... -- <d3jax table flags for the defended subset>
The table flags after ``--`` are those of ``d3jax table`` (its --attacks is the defended subset);
the attack rows are printed as a markdown table and written to <out>/attacks-<names>.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from d3jax import cli
from d3jax.rundirs import checkpoint, runs
from d3jax.engine import compile_cache
from d3jax.studies import table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--all-attacks", nargs="+", required=True)
  parser.add_argument("--attacks-only", action="store_true",
                      help="only the attack rows (e.g. beside another process running the table)")
  args, rest = parser.parse_known_args()
  compile_cache.enable()
  command = cli.parse(["table", *[a for a in rest if a != "--"]])
  out = Path(command.out)
  out.mkdir(parents=True, exist_ok=True)
  spec = dataclasses.replace(command.spec, attacks=tuple(args.all_attacks),
                             ratios={k: v for k, v in command.spec.ratios.items()
                                     if k in args.all_attacks})
  tracking = runs.Tracking(eval_every=0, progress=False)
  lines = ["| attack | seed | ACC | ASR | RA | attack epochs | wall s |", "|---|---|---|---|---|---|---|"]
  for seed in range(spec.seeds):  # the table's --seeds: seed s trains every attack with seed s
    for attack in spec.attacks:
      table.attack_cell(spec, out, attack, seed, tracking)
      metrics = checkpoint.load_json(out / "attacks" / f"{attack}-s{seed}", "metrics.json")
      lines.append(f"| {attack} | {seed} | {100 * metrics['acc']:.2f} | {100 * metrics['asr']:.2f} | "
                   f"{100 * metrics['ra']:.2f} | {spec.train.epochs} | {metrics['wall_time_s']:.0f} |")
      (out / f"attacks-{'-'.join(spec.attacks)}.md").write_text("\n".join(lines) + "\n")
      print(lines[-1], flush=True)
  if args.attacks_only:
    return
  table.run_table(command.spec, out, progress=False)
  print((out / "table.txt").read_text())


if __name__ == "__main__":
  sys.exit(main())
