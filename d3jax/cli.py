"""The ``d3jax`` command: ``demo``, ``attack`` and ``defend`` (DESIGN.md "The command line")."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from d3jax import checkpoint, pipeline
from d3jax.attacks.training import AttackTrainConfig
from d3jax.defenses import D3Config, FTConfig


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="d3jax", description="Backdoor attacks and defenses in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)

  demo = commands.add_parser("demo", help="backdoor, defend with FT and D3, print the table")
  demo.add_argument("--out", default="demo_out", help="directory for results.json")

  attack = commands.add_parser("attack", help="train a backdoored model into a run directory")
  attack.add_argument("--out", required=True, help="run directory to write")
  attack.add_argument("--dataset", default="mnist5k", help="digits | mnist5k | npz:<path> | tfds:<name>")
  attack.add_argument("--model", default="small_cnn")
  attack.add_argument("--width", type=int, default=None, help="model width option")
  attack.add_argument("--attack", default="badnets", help="badnets | blended")
  attack.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio")
  attack.add_argument("--target", type=int, default=0)
  attack.add_argument("--label-mode", default="all2one", help="all2one | all2all | clean_label")
  attack.add_argument("--lr", type=float, default=0.05)
  add_training_options(attack, epochs=8, batch_size=128)

  defend = commands.add_parser("defend", help="defend a saved backdoored model")
  defend.add_argument("--attack-run", required=True, help="run directory written by `d3jax attack`")
  defend.add_argument("--out", required=True, help="run directory to write")
  defend.add_argument("--defense", default="d3", help="d3 | ft")
  defend.add_argument("--preset", default="paper", help="D3 preset: paper | official")
  defend.add_argument("--reserved-ratio", type=float, default=0.05)
  add_training_options(defend, epochs=100, batch_size=256)
  return parser


def add_training_options(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int) -> None:
  """--epochs, --batch-size, --flip and --seed, shared by `attack` and `defend`."""
  parser.add_argument("--epochs", type=int, default=epochs)
  parser.add_argument("--batch-size", type=int, default=batch_size)
  parser.add_argument("--flip", action="store_true", help="random horizontal flips (CIFAR-10, spec §1.3)")
  parser.add_argument("--seed", type=int, default=0)


def command_attack(args: argparse.Namespace) -> None:
  options = {} if args.width is None else {"width": args.width}
  run = pipeline.AttackRun(
      dataset=args.dataset, model=args.model, model_options=options, attack=args.attack,
      ratio=args.ratio, target=args.target, label_mode=args.label_mode, seed=args.seed,
      train=AttackTrainConfig(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size,
                              cosine_t_max=args.epochs, flip=args.flip))
  backdoored = pipeline.attack(run)
  pipeline.save_attack(backdoored, args.out)
  print(pipeline.format_table([pipeline.table_row(args.attack, "none", backdoored.baseline)]))


def command_defend(args: argparse.Namespace) -> None:
  if args.defense == "d3":
    config = D3Config.preset(args.preset, epochs=args.epochs, batch_size=args.batch_size, flip=args.flip)
  elif args.defense == "ft":
    config = FTConfig(epochs=args.epochs, batch_size=args.batch_size, flip=args.flip)
  else:
    raise SystemExit(f"d3jax defend: unknown defense {args.defense!r}; choose d3 or ft.")
  backdoored = pipeline.load_attack(args.attack_run)
  row, variables, log = pipeline.defense_row(backdoored, args.defense, config,
                                             reserved_ratio=args.reserved_ratio, seed=args.seed)
  before = pipeline.table_row(backdoored.run.attack, "none", backdoored.baseline)
  checkpoint.save_run(args.out, variables, metrics=row, config={
      "attack_run": str(args.attack_run), "defense": args.defense, "reserved_ratio": args.reserved_ratio,
      "seed": args.seed, "defense_config": dataclasses.asdict(log["config"]),
      "losses": log["losses"], "wall_time_s": log["wall_time_s"]})
  print(pipeline.format_table([before, row]))


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "demo":
    from d3jax.demo import run_demo
    run_demo(args.out)
  elif args.command == "attack":
    command_attack(args)
  else:
    command_defend(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
