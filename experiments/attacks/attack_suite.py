"""Clean ACC, ASR and RA of every registered attack after backdoor training, per dataset.

Datasets: ``mnist5k`` with a small CNN, and the CIFAR-10 subset in ../shared/data with a narrow
PreAct-ResNet18 (width 16). Every attack uses its registry defaults, all2one to target 0 at ratio
0.1 (SIG: clean-label, so the whole target class of the subset), BackdoorBench's recipe (SGD
momentum 0.9, weight decay 5e-4, per-epoch cosine) with the epochs and learning rate given here.
LF and TrojanNN are crafted against a clean model trained first with the same recipe (SSBA trains
its encoder on the clean images). The adaptive attack is BadNets trained with ASAM at ``--rho``.

Run from the repository root (writes a markdown table and a JSON file; minutes to hours on CPU):
  .venv/bin/python experiments/attacks/attack_suite.py --out experiments/results/attack_suite
Smoke run (seconds): --datasets digits --epochs 1 --attacks badnets,wanet
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from d3jax import attacks
from d3jax.engine import train
from d3jax.attacks import backdoor_test_set
from d3jax.attacks.training import (AttackTrainConfig, attack_program, attack_sets, build_trigger,
                                    train_clean)
from d3jax.data import load_dataset
from d3jax.workflows.evaluation import evaluate
from d3jax.models import get_model

CIFAR = "../shared/data/cifar10_10k_jpegsrc.npz"
SETTINGS = {  # dataset name -> (load spec, model, model options, flip)
    "digits": ("digits", "small_cnn", {"width": 8}, False),
    "mnist5k": ("mnist5k", "small_cnn", {"width": 32}, False),
    "cifar10k": (f"npz:{CIFAR}", "preact_resnet18", {"width": 16}, True),
}


def run_dataset(name: str, attack_names: list[str], args: argparse.Namespace) -> list[dict]:
  spec, model_name, options, flip = SETTINGS[name]
  dataset = load_dataset(spec)
  model = get_model(model_name, dataset.num_classes, **options)
  normalization = train.Normalization(dataset.mean, dataset.std)
  recipe = AttackTrainConfig(epochs=args.epochs, learning_rate=args.lr, cosine_t_max=args.epochs, flip=flip)
  key = jax.random.key(args.seed)

  clean = None
  if any(attacks.get(name).crafts_on == "model" for name in attack_names):  # one for LF and TrojanNN
    clean = train_clean(model, dataset, normalization, recipe, jax.random.fold_in(key, 5))
  rows = []
  for attack_name in attack_names:
    start = time.time()
    config = attacks.get(attack_name, **({"rho": args.rho} if attack_name == "adaptive" else {}))
    trigger = build_trigger(config, dataset, model=model, normalization=normalization, config=recipe,
                            target=0, key=jax.random.fold_in(key, 3), clean=clean)
    label_mode = config.label_modes[0]
    ratio = float(np.mean(dataset.y_train == 0)) if label_mode == "clean_label" else 0.1
    train_set, bd_test = attack_sets(config, trigger, dataset, ratio=ratio, target=0,
                                     label_mode=label_mode, key=jax.random.fold_in(key, 4))
    program = attack_program(config, model, normalization, recipe, ratio=ratio, target=0,
                             label_mode=label_mode, num_classes=dataset.num_classes)
    state = train.train_state(program, train.init_variables(model, dataset.image_shape, jax.random.fold_in(key, 1)),
                              train_set.x, train_set.y, jax.random.fold_in(key, 2),
                              desc=f"{name} {attack_name}")[0]
    variables = state.variables
    if bd_test is None:  # the trigger trained with the model (input-aware)
      bd_test = backdoor_test_set(dataset.x_test, dataset.y_test,
                                  program.trigger(state, dataset.image_shape), target=0,
                                  label_mode=label_mode, num_classes=dataset.num_classes)
    measured = evaluate(model, variables, dataset.x_test, dataset.y_test, bd_test, normalization,
                        untargeted=label_mode == "untargeted")
    rows.append({"dataset": name, "model": f"{model_name} {options}", "attack": attack_name,
                 "epochs": args.epochs, "acc": measured.acc, "asr": measured.asr, "ra": measured.ra,
                 "wall_s": round(time.time() - start, 1)})
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--datasets", default="mnist5k,cifar10k")
  parser.add_argument("--attacks", default=",".join(attacks.names()))
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/results/attack_suite")
  args = parser.parse_args()
  rows = []
  for name in args.datasets.split(","):
    if name == "cifar10k" and not os.path.isfile(CIFAR):
      print(f"skip cifar10k: {CIFAR} not found (see ../shared/data/README.md)")
      continue
    rows += run_dataset(name, args.attacks.split(","), args)
  with open(f"{args.out}.json", "w") as f:
    json.dump({"argv": vars(args), "rows": rows}, f, indent=1)
  lines = ["| dataset | model | attack | epochs | ACC | ASR | RA | wall (s) |", "|---" * 8 + "|"]
  lines += [f"| {r['dataset']} | {r['model']} | {r['attack']} | {r['epochs']} | {100 * r['acc']:.2f} | "
            f"{100 * r['asr']:.2f} | {100 * r['ra']:.2f} | {r['wall_s']} |" for r in rows]
  with open(f"{args.out}.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
