"""The trigger gallery of every registered data-poisoning trigger (and WaNet's fixed warp):
clean | poisoned | magnified residual, on CIFAR-10 test images.

LF and TrojanNN are crafted against a clean small CNN trained here for a few epochs (a gallery
needs the trigger's look, not a strong model); LF runs at most ``--lf-passes`` passes and SSBA's
encoder trains for ``--ssba-steps`` steps (its default is 2000).

Run from the repository root:
  .venv/bin/python experiments/attacks/attack_gallery.py [--out experiments/results/attack_gallery.png]
Uses ../shared/data/cifar10_10k_jpegsrc.npz when present, else the embedded mnist5k.
"""
from __future__ import annotations

import argparse
import os
import time

import jax

from d3jax import attacks
from d3jax.engine import train
from d3jax.attacks.training import AttackTrainConfig, build_trigger, train_clean
from d3jax.data import load_dataset
from d3jax.models import get_model

CIFAR = "../shared/data/cifar10_10k_jpegsrc.npz"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/results/attack_gallery.png")
  parser.add_argument("--clean-epochs", type=int, default=3)
  parser.add_argument("--lf-passes", type=int, default=3)
  parser.add_argument("--ssba-steps", type=int, default=300)
  parser.add_argument("--images", type=int, default=4)
  args = parser.parse_args()
  dataset = load_dataset(f"npz:{CIFAR}" if os.path.isfile(CIFAR) else "mnist5k")
  key = jax.random.key(0)
  start = time.time()
  model = get_model("small_cnn", dataset.num_classes, width=16)
  normalization = train.Normalization(dataset.mean, dataset.std)
  recipe = AttackTrainConfig(epochs=args.clean_epochs, learning_rate=0.05, cosine_t_max=args.clean_epochs)
  clean = train_clean(model, dataset, normalization, recipe, key)
  # The adaptive attack trains a base attack's trigger with SAM: its row would repeat BadNets'.
  # Input-aware's trigger is trained with its model: it has none before an attack run.
  configs = {name: attacks.get(name) for name in attacks.names() if name != "adaptive"
             and not getattr(attacks.get(name), "trained_trigger", False)}
  configs["lf"] = attacks.get("lf", max_passes=args.lf_passes)
  configs["ssba"] = attacks.get("ssba", steps=args.ssba_steps)
  triggers = {name: build_trigger(config, dataset, model=model, normalization=normalization,
                                  config=recipe, target=0, key=jax.random.fold_in(key, 1), clean=clean)
              for name, config in configs.items()}
  images = dataset.x_test[dataset.y_test != 0][:args.images]
  attacks.write_gallery(triggers, images, args.out)
  print(f"wrote {args.out} ({dataset.name}, {', '.join(triggers)}) in {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
