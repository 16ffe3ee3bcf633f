"""The D3 paper's experiments at paper scale, for a machine with an accelerator.

Each experiment is the list of ``d3jax`` commands that reproduces one table or figure of the D3
paper (ICCV 2025) with its published settings: CIFAR-10 through ``tfds:cifar10`` (prepare it as the
README shows; GTSRB and Tiny-ImageNet by ``--dataset``), PreAct-ResNet18 at full width (``--model
vgg19_bn`` for the supplement's VGG rows), BackdoorBench's attack recipe (100 epochs, SGD 0.01,
cosine, batch 128, random crop, flips on CIFAR-10), 10% poisoning, a 5% reserved set, every defense
with its published defaults.

  table1   Table 1: seven attacks × FT, ANP, FP, NC, NAD, i-BAU, FT-SAM, SAU, D3 (plus NFT, FST,
           Super-FT), one ``d3jax table``; with ``--import-dir`` the attack models are BackdoorBench's
           own checkpoints (``DIR/<attack>/attack_result.pt``), imported and defended one by one.
  table5   Table 5: the adaptive (ASAM) attack on BadNets and Blended at budgets 1, 2, 3 × FT, FT-SAM,
           FST, Super-FT, NFT, D3.
  table6   Table 6: D3 with ε ∈ {0, …, 0.5} on BadNets, Blended, WaNet (one sweep per attack).
  table7   Table 7: D3 with λ ∈ {1, 10, 20, 30, 40} on the same attacks.
  figure2  Figure 2: clean/backdoor loss, ACC and ASR along the FT path, four attacks.
  figure3  Figure 3: t-SNE before/after D3 and weight-difference histograms (FT vs D3), BadNets.

``--smoke`` runs the same commands on the embedded digits set with a width-4 CNN, one attack epoch
and one defense epoch, and the first attack/defense of each list only: a minutes-long check (run by
the slow test tier) that the scripts still work, whose numbers mean nothing.

Usage:  python experiments/paper/run.py table1 --out runs/paper [--smoke] [--dry-run]
Results: each command's run directories under OUT/<experiment>/ (tables: table.txt, table.csv,
der.png; sweeps: results.csv and heat maps; figures: the analysis PNGs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3jax import cli

TABLE1_ATTACKS = ("badnets", "blended", "wanet", "lf", "input_aware", "sig", "ssba")
TABLE1_DEFENSES = ("ft", "anp", "fp", "nc", "nad", "i-bau", "ft-sam", "sau", "d3", "nft", "fst",
                   "super-ft")
TABLE5_DEFENSES = ("ft", "ft-sam", "fst", "super-ft", "nft", "d3")
ABLATION_ATTACKS = ("badnets", "blended", "wanet")
FIGURE2_ATTACKS = ("badnets", "blended", "wanet", "sig")


def settings(smoke: bool, dataset: str, model: str) -> dict:
  """Dataset, model and recipe flags: the paper's, or the smoke setting's."""
  if smoke:
    return {"data": ["--dataset", "digits", "--model", "small_cnn", "--model-options", "width", "4"],
            "attack_train": ["--epochs", "1", "--batch-size", "64"],
            "defense_epochs": ["--epochs", "1"], "table_defense_epochs": ["--defense-epochs", "1"],
            "first": 1}
  flip = ["--flip"] if dataset.startswith("tfds:cifar10") else []
  return {"data": ["--dataset", dataset, "--model", model],
          "attack_train": ["--epochs", "100", "--batch-size", "128", *flip],
          "defense_epochs": [], "table_defense_epochs": [], "first": None}


def _take(names: tuple[str, ...], s: dict) -> list[str]:
  return list(names[:s["first"]] if s["first"] else names)


def attack_command(out: Path, attack: str, s: dict, options: list[str] = ()) -> list[str]:
  return ["attack", "--out", str(out), "--attack", attack, *s["data"], *s["attack_train"],
          *(["--attack-options", *options] if options else []), "--quiet"]


def table1(out: Path, s: dict, import_dir: Path | None, dataset: str) -> list[list[str]]:
  attacks, defenses = _take(TABLE1_ATTACKS, s), _take(TABLE1_DEFENSES, s)
  if import_dir is None:
    return [["table", "--out", str(out), *s["data"], *s["attack_train"],
             *s["table_defense_epochs"], "--attacks", *attacks, "--defenses", *defenses, "--quiet"]]
  commands = []
  for attack in attacks:
    run = out / "attacks" / attack
    commands.append(["import", str(import_dir / attack / "attack_result.pt"), "--dataset", dataset,
                     "--attack", attack, "--out", str(run), "--quiet"])
    commands += [["defend", "--attack-run", str(run), "--out", str(out / "defenses" / attack / name),
                  "--quiet", name, *s["defense_epochs"]] for name in defenses]
  return commands


def table5(out: Path, s: dict) -> list[list[str]]:
  commands = []
  for base in _take(("badnets", "blended"), s):
    for rho in _take(("1.0", "2.0", "3.0"), s):
      run = out / "attacks" / f"adaptive-{base}-rho{rho}"
      commands.append(attack_command(run, "adaptive", s, ["base", base, "rho", rho]))
      commands += [["defend", "--attack-run", str(run), "--out",
                    str(out / "defenses" / f"{base}-rho{rho}" / name), "--quiet", name,
                    *s["defense_epochs"]] for name in _take(TABLE5_DEFENSES, s)]
  return commands


def ablation(out: Path, s: dict, grid: str) -> list[list[str]]:
  commands = []
  for attack in _take(ABLATION_ATTACKS, s):
    run = out / "attacks" / attack
    commands.append(attack_command(run, attack, s))
    commands.append(["sweep", "--attack-run", str(run), "--out", str(out / "sweeps" / attack),
                     "--grid", grid, "--quiet", "d3", *s["defense_epochs"]])
  return commands


def figure2(out: Path, s: dict) -> list[list[str]]:
  commands = []
  for attack in _take(FIGURE2_ATTACKS, s):
    run, ft = out / "attacks" / attack, out / "defenses" / attack / "ft"
    commands += [attack_command(run, attack, s),
                 ["defend", "--attack-run", str(run), "--out", str(ft), "--quiet", "ft",
                  *s["defense_epochs"]],
                 ["analyze", str(run), "--defended", str(ft), "--analyses", "path",
                  "--out", str(out / "figures" / attack), "--quiet"]]
  return commands


def figure3(out: Path, s: dict) -> list[list[str]]:
  run = out / "attacks" / "badnets"
  defended = [out / "defenses" / "badnets" / name for name in ("ft", "d3")]
  return [attack_command(run, "badnets", s),
          *[["defend", "--attack-run", str(run), "--out", str(path), "--quiet", path.name,
             *s["defense_epochs"]] for path in defended],
          ["analyze", str(run), "--defended", *map(str, defended), "--analyses", "tsne", "weights",
           "--out", str(out / "figures"), "--quiet"]]


EXPERIMENTS = ("table1", "table5", "table6", "table7", "figure2", "figure3")


def commands_for(name: str, out: Path, *, smoke: bool = False, dataset: str = "tfds:cifar10",
                 model: str = "preact_resnet18", import_dir: Path | None = None
                 ) -> list[list[str]]:
  """The ``d3jax`` command lines of experiment ``name`` (one of :data:`EXPERIMENTS`)."""
  s = settings(smoke, dataset, model)
  out = out / name
  if name == "table1":
    return table1(out, s, import_dir, dataset)
  if name == "table5":
    return table5(out, s)
  if name in ("table6", "table7"):
    grid = "eps=0,0.1,0.2,0.3,0.4,0.5" if name == "table6" else "lmd=1,10,20,30,40"
    return ablation(out, s, "eps=0,0.1" if smoke and name == "table6" else
                    "lmd=1,10" if smoke else grid)
  if name == "figure2":
    return figure2(out, s)
  if name == "figure3":
    return figure3(out, s)
  raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}.")


def run(commands: list[list[str]], dry_run: bool = False) -> None:
  """Runs each command with the ``d3jax`` command line in this process; a finished run directory
  is skipped (``--out`` exists), so a stopped experiment continues where it was."""
  for command in commands:
    out = command[command.index("--out") + 1] if "--out" in command else None
    print("d3jax " + " ".join(command), flush=True)
    if dry_run or (out and Path(out).exists() and command[0] != "table"):
      continue
    status = cli.main(command)
    if status != 0:
      raise SystemExit(f"command failed with status {status}: d3jax {' '.join(command)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("experiments", nargs="+", choices=EXPERIMENTS)
  parser.add_argument("--out", type=Path, default=Path("runs/paper"))
  parser.add_argument("--dataset", default="tfds:cifar10")
  parser.add_argument("--model", default="preact_resnet18")
  parser.add_argument("--import-dir", type=Path, default=None,
                      help="BackdoorBench attack results, DIR/<attack>/attack_result.pt (table1)")
  parser.add_argument("--smoke", action="store_true", help="tiny setting: checks the scripts run")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  args = parser.parse_args()
  for name in args.experiments:
    run(commands_for(name, args.out, smoke=args.smoke, dataset=args.dataset, model=args.model,
                     import_dir=args.import_dir), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
