"""Differential run: d3jax's D3/FT/FT-SAM against the independent PyTorch ones, same weights, same data.

For each case (dataset × attack) one d3jax attack run is trained (or reused from OUT/runs), its
weights are exported to PyTorch (:func:`d3jax.interop.to_torch_state_dict`), and for each seed the
same reserved indices (``ReservedSplit(ratio=0.05, holdout=0, seed=s)``) are defended by both
implementations: d3jax through ``pipeline.defend_model``, PyTorch through
``experiments/fidelity/torch_reference.py``. Both are measured on the same clean test set and the same
stored backdoor test set. Training randomness (warm-up draw, batch order, crops) differs between the
two by construction, so the comparison is between seed distributions.

Verdict per (case, defense, metric), fixed before any run: the two means agree when they differ by
at most max(3 percentage points, 2 × the larger of the two seed standard deviations); otherwise the
cell is a discrepancy to explain.

Usage (from the repository root; torch from the test extra):
  taskset -c 0 .venv/bin/python experiments/fidelity/differential.py \\
      --out experiments/results/fidelity/mnist5k --cases mnist5k:badnets mnist5k:blended &
  taskset -c 1 .venv/bin/python experiments/fidelity/differential.py \\
      --out experiments/results/fidelity/cifar --cases cifar:badnets cifar:blended &
(one process per core; seeds 0 1 2 and 100 epochs by default)
Writes OUT/differential.json (every run) and OUT/differential.md (the table); rerunning skips runs
already in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference  # noqa: E402

from d3jax import interop
from d3jax.engine import compile_cache
from d3jax.workflows import pipeline
from d3jax.rundirs import runs  # noqa: E402
from d3jax.attacks.training import AttackTrainConfig  # noqa: E402
from d3jax.defenses import D3Config, FTConfig  # noqa: E402
from d3jax.defenses.ft_sam import FTSAMConfig  # noqa: E402
from d3jax.interop import torch_models  # noqa: E402

CIFAR = Path("../shared/data/cifar10_10k_jpegsrc.npz")
# The attack recipes of experiments/results/table_mnist5k and table_cifar.
ATTACK_ARGS = {
    "mnist5k": dict(dataset="mnist5k", model="small_cnn", model_options={"width": 16},
                    train=dict(epochs=15, cosine_t_max=15, learning_rate=0.05)),
    "cifar": dict(dataset=f"npz:{CIFAR.resolve()}", model="preact_resnet18",
                  model_options={"width": 8},
                  train=dict(epochs=20, cosine_t_max=20, learning_rate=0.05, crop_padding=0,
                             flip=True)),
}
D3JAX_CONFIGS = {"d3-paper": D3Config.preset("paper"), "d3-official": D3Config.preset("official"),
                 "ft": FTConfig(), "ft-sam": FTSAMConfig()}
D3JAX_NAMES = {"d3-paper": "d3", "d3-official": "d3", "ft": "ft", "ft-sam": "ft-sam"}


def attack_run(out: Path, dataset: str, attack: str) -> runs.LoadedRun:
  path = out / "runs" / f"{dataset}-{attack}"
  if path.exists():
    return runs.load(path)
  settings = ATTACK_ARGS[dataset]
  run = pipeline.AttackRun(dataset=settings["dataset"], model=settings["model"],
                           model_options=settings["model_options"], attack=attack,
                           train=AttackTrainConfig(**settings["train"]))
  loaded, _ = runs.write_attack(run, path, tracking=runs.Tracking(eval_every=0, progress=False))
  return loaded


def torch_model(loaded: runs.LoadedRun) -> torch.nn.Module:
  spec = loaded.config["model"]
  options, channels = spec["options"], spec["image_shape"][-1]
  builders = {"small_cnn": lambda: torch_models.SmallCNN(spec["num_classes"], options["width"],
                                                         channels),
              "preact_resnet18": lambda: torch_models.PreActResNet18(
                  spec["num_classes"], options["width"], channels)}
  model = builders[spec["name"]]()
  state = interop.to_torch_state_dict(spec["name"], loaded.backdoored.variables, **options)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return model


def measure_torch(model, backdoored) -> dict:
  dataset, test = backdoored.dataset, backdoored.backdoor_test
  mean, std = backdoored.normalization.mean, backdoored.normalization.std
  acc = float(np.mean(torch_reference.predict(model, dataset.x_test, mean, std) == dataset.y_test))
  predicted = torch_reference.predict(model, test.x, mean, std)
  return {"acc": acc, "asr": float(np.mean(predicted == test.y)),
          "ra": float(np.mean(predicted == test.y_orig))}


def one_run(loaded, defense: str, seed: int, side: str, epochs: int) -> dict:
  backdoored = loaded.backdoored
  split = pipeline.ReservedSplit(ratio=0.05, holdout=0.0, seed=seed)
  (images, labels), _ = split.draw(backdoored.dataset)
  start = time.perf_counter()
  if side == "d3jax":
    config = dataclasses.replace(D3JAX_CONFIGS[defense], epochs=epochs)
    variables, _ = pipeline.defend_model(backdoored, D3JAX_NAMES[defense], config, images, labels,
                                         seed=seed, progress=False)
    measured = backdoored.measure(variables)._asdict()
  else:
    reserved = torch_reference.Reserved(images, labels, backdoored.normalization.mean,
                                        backdoored.normalization.std)
    model = torch_reference.DEFENSES[defense](torch_model(loaded), reserved, seed, epochs)
    measured = measure_torch(model, backdoored)
  return {**measured, "wall_s": round(time.perf_counter() - start, 1), "reserved": len(labels)}


def verdict(a: list[float], b: list[float]) -> str:
  gap = abs(np.mean(a) - np.mean(b))
  bound = max(0.03, 2 * max(np.std(a, ddof=1), np.std(b, ddof=1))) if min(len(a), len(b)) > 1 \
      else 0.03
  return "agree" if gap <= bound else "DIFFER"


def write_table(results: dict, out: Path, header: str) -> None:
  lines = [header, "", "| case | defense | metric | d3jax (mean ± sd) | PyTorch (mean ± sd) | verdict |",
           "|---|---|---|---|---|---|"]
  cases = sorted({tuple(k.split("|")[:2]) for k in results})
  for case, defense in cases:
    for metric in ("acc", "asr"):
      sides = {}
      for side in ("d3jax", "torch"):
        sides[side] = [r[metric] for k, r in results.items()
                       if k.startswith(f"{case}|{defense}|{side}|")]
      if not sides["d3jax"] or not sides["torch"]:
        continue
      cells = [f"{100 * np.mean(v):.1f} ± {100 * np.std(v, ddof=1) if len(v) > 1 else 0:.1f} "
               f"(n={len(v)})" for v in sides.values()]
      lines.append(f"| {case} | {defense} | {metric.upper()} | {cells[0]} | {cells[1]} | "
                   f"{verdict(sides['d3jax'], sides['torch'])} |")
  (out / "differential.md").write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("experiments/results/fidelity"))
  parser.add_argument("--cases", nargs="+", default=["mnist5k:badnets", "mnist5k:blended"])
  parser.add_argument("--defenses", nargs="+", default=list(D3JAX_CONFIGS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=100)
  parser.add_argument("--threads", type=int, default=1,
                      help="PyTorch threads (two abort in training on AMD EPYC with torch 2.13)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  compile_cache.enable()  # the seeds of a case share shapes: compile each program once
  args.out.mkdir(parents=True, exist_ok=True)
  store = args.out / "differential.json"
  results = json.loads(store.read_text()) if store.exists() else {}
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "unknown CPU")
  for case in args.cases:
    dataset, attack = case.split(":")
    loaded = attack_run(args.out, dataset, attack)
    print(f"{case}: backdoored ACC {loaded.metrics['acc']:.4f} ASR {loaded.metrics['asr']:.4f}",
          flush=True)
    for defense in args.defenses:
      for seed in args.seeds:
        for side in ("d3jax", "torch"):
          key = f"{case}|{defense}|{side}|{seed}|{args.epochs}"
          if key in results:
            continue
          results[key] = one_run(loaded, defense, seed, side, args.epochs)
          print(key, results[key], flush=True)
          store.write_text(json.dumps(results, indent=1, sort_keys=True))
  write_table(results, args.out, f"# Differential run ({args.epochs} epochs; {cpu}, "
              f"{os.cpu_count()} cores; torch {torch.__version__})")


if __name__ == "__main__":
  main()
