"""Same-run benchmark of d3jax against an equivalent PyTorch implementation, on this machine.

    python benchmarks/bench.py [--sections steps,eval,grid] [--rounds 5] [--json out.json]

Needs the ``[bench]`` extra (PyTorch, CPU wheel). Everything is measured in this one process,
the two sides interleaved round by round (the machine is shared and noisy): medians of per-step
wall times after warm-up, reported as images per second and as ratios.

* ``steps``: one training step (forward, backward, update) of D3 (hinge loss, distance ascent on
  the head, SGD momentum, projection of the head onto its norm) and of plain SGD (cross-entropy,
  momentum 0.9, weight decay 5e-4), train-mode BN, batch 128 of 32×32×3 images, no augmentation,
  for the small CNN (width 32) and PreAct-ResNet18 (width 64); d3jax with im2col everywhere and
  with the default ``auto`` lowering (Winograd for the 3×3 stride-1 layers of ≥ 64 channels, im2col
  elsewhere), each step its own jitted call. ``--scan-steps K`` adds, for both, a side that runs K
  steps inside one jitted ``lax.scan`` (state donated), the form the engine's epochs take; its img/s
  count all K steps of a call. Compile seconds are those of d3jax's first call.
* ``eval``: eval-mode logits of 1,000 images in batches of 500.
* ``grid``: one epoch of a G-run D3 grid, as one vmap over all G runs (``vmap``) and as the runs
  scanned one at a time inside the same program (``scan``, the CPU default), against the same G
  runs one by one (each run alone, the same compiled epoch), for the demo's small CNN (width 16, 28×28×1, 200 reserved
  images, batch 32) and PreAct-ResNet18 (width 64, 32×32×3, 256 images, batch 128).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d3jax import defenses
from d3jax.engine import train
from d3jax.models import get_model
from d3jax.workflows.sweep import init_grid
from timing import interleaved

NORM = train.Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


# ------------------------------------------------------------------------------------------------
# PyTorch models equivalent to d3jax's (same layers, same shapes; written for this benchmark).
# ------------------------------------------------------------------------------------------------

class TorchPreActBlock(nn.Module):
  def __init__(self, cin: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.shortcut = (nn.Conv2d(cin, planes, 1, stride, bias=False)
                     if stride != 1 or cin != planes else None)

  def forward(self, x):
    a = F.relu(self.bn1(x))
    shortcut = self.shortcut(a) if self.shortcut is not None else x
    out = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return out + shortcut


class TorchPreActResNet18(nn.Module):
  def __init__(self, num_classes: int = 10, width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    blocks, cin = [], width
    for multiple, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
      for index in range(2):
        blocks.append(TorchPreActBlock(cin, width * multiple, stride if index == 0 else 1))
        cin = width * multiple
    self.blocks = nn.Sequential(*blocks)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.linear(self.blocks(self.conv1(x)).mean(dim=(2, 3)))


class TorchSmallCNN(nn.Module):
  def __init__(self, num_classes: int = 10, width: int = 32, channels: int = 3):
    super().__init__()
    widths = (width, width, 2 * width, 2 * width)
    layers, cin = [], channels
    for index, cout in enumerate(widths, start=1):
      layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
      if index % 2 == 0:
        layers.append(nn.MaxPool2d(2))
      cin = cout
    self.features = nn.Sequential(*layers)
    self.linear = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.linear(self.features(x).mean(dim=(2, 3)))


def torch_model(name: str, width: int) -> nn.Module:
  model = TorchPreActResNet18(width=width) if name == "preact_resnet18" else TorchSmallCNN(width=width)
  return model.to(memory_format=torch.channels_last)


def torch_step_fn(model: nn.Module, kind: str, lmd: float = 10.0, eps: float = 0.1):
  """A PyTorch training step equivalent to d3jax's D3 (``kind="d3"``) or SGD (``"sgd"``) step."""
  mean = torch.tensor(NORM.mean).view(1, 3, 1, 1)
  std = torch.tensor(NORM.std).view(1, 3, 1, 1)
  head = model.linear.weight
  if kind == "d3":
    w0 = head.detach().clone()
    target = w0.norm()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  else:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  model.train()

  def step(images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    x = ((images_uint8.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    logits = model(x)
    if kind == "d3":
      hinge = torch.clamp(F.cross_entropy(logits, labels, reduction="none") - eps, min=0).mean()
      scale = lmd + 1 if lmd > 1 else 1.0
      loss = (lmd * hinge - (head - w0).norm()) / scale
    else:
      loss = F.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if kind == "d3":
      with torch.no_grad():
        head.mul_(target / head.norm())
    return float(loss.detach())

  return step


# ------------------------------------------------------------------------------------------------
# d3jax sides.
# ------------------------------------------------------------------------------------------------

def recipe(kind: str, batch_size: int, epochs: int = 100, precision: str = "f32"):
  return defenses.get("d3" if kind == "d3" else "ft", batch_size=batch_size, crop_padding=0,
                      epochs=epochs, precision=precision)


def jax_step_fn(name: str, width: int, kind: str, conv: str, images: np.ndarray, labels: np.ndarray,
                scan_steps: int = 0, precision: str = "f32"):
  """A callable running one d3jax step (or ``scan_steps`` steps in one ``lax.scan``) and the
  seconds of its first call (compilation included)."""
  model = get_model(name, 10, width=width, conv=conv)
  program = train.Program(model, recipe(kind, images.shape[0], precision=precision), NORM)
  variables = train.init_variables(model, images.shape[1:], jax.random.key(0))
  state = train.init_state(program, variables, images.shape[0], jax.random.key(1))
  batch = train.Batch(jnp.asarray(images), jnp.asarray(labels), jnp.ones(images.shape[0], bool))
  if scan_steps:
    step = jax.jit(lambda s, b: jax.lax.scan(lambda c, _: program.step(c, b), s, None,
                                             length=scan_steps), donate_argnums=0)
  else:
    step = jax.jit(program.step)
  holder = {"state": state}

  def run() -> None:
    holder["state"], metrics = step(holder["state"], batch)
    metrics["loss"].block_until_ready()

  start = time.perf_counter()
  run()
  return run, time.perf_counter() - start


def autocast_bf16(step):
  """A PyTorch step under ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
  def run(*args):
    with torch.autocast("cpu", dtype=torch.bfloat16):
      return step(*args)
  return run


def bench_steps(rounds: int, steps: int, lax_models: tuple[str, ...], models: tuple[str, ...],
                scan_steps: int = 0, bf16: bool = False) -> list[dict]:
  """Steps per second of both sides; with ``bf16`` also d3jax ``precision="bf16"`` (``auto``
  lowering, per call and scanned) against PyTorch autocast-bf16."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 128).astype(np.int32)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  t_labels = torch.from_numpy(labels).long()
  rows = []
  for name, width in (("small_cnn", 32), ("preact_resnet18", 64)):
    if name not in models:
      continue
    for kind in ("d3", "sgd"):
      sides, compile_s = {}, {}
      lowerings = ("im2col", "auto") + (("lax",) if name in lax_models else ())
      scanned = ("im2col", "auto") if scan_steps else ()
      for conv in lowerings:
        sides[f"d3jax-{conv}"], compile_s[conv] = jax_step_fn(name, width, kind, conv, images, labels)
      for conv in scanned:
        sides[f"d3jax-scan-{conv}"], compile_s[f"scan_{conv}"] = jax_step_fn(
            name, width, kind, conv, images, labels, scan_steps)
      if bf16:
        sides["d3jax-auto-bf16"], compile_s["auto_bf16"] = jax_step_fn(
            name, width, kind, "auto", images, labels, precision="bf16")
        if scan_steps:
          sides["d3jax-scan-auto-bf16"], compile_s["scan_auto_bf16"] = jax_step_fn(
              name, width, kind, "auto", images, labels, scan_steps, "bf16")
        torch.manual_seed(0)
        t_bf16 = autocast_bf16(torch_step_fn(torch_model(name, width), kind))
        sides["torch-bf16"] = lambda: t_bf16(t_images, t_labels)
      torch.manual_seed(0)
      t_step = torch_step_fn(torch_model(name, width), kind)
      sides["torch"] = lambda: t_step(t_images, t_labels)
      medians = interleaved(sides, rounds, steps)
      row = {"model": name, "step": kind, "torch_img_s": 128 / medians["torch"]}
      for conv in lowerings:
        row[f"{conv}_img_s"] = 128 / medians[f"d3jax-{conv}"]
        row[f"{conv}_ratio"] = medians["torch"] / medians[f"d3jax-{conv}"]
        row[f"{conv}_compile_s"] = compile_s[conv]
      if scanned:
        row["scan_steps"] = scan_steps
      for conv in scanned:
        row[f"scan_{conv}_img_s"] = 128 * scan_steps / medians[f"d3jax-scan-{conv}"]
        row[f"scan_{conv}_ratio"] = row[f"scan_{conv}_img_s"] / row["torch_img_s"]
        row[f"scan_{conv}_compile_s"] = compile_s[f"scan_{conv}"]
      if bf16:
        row["torch_bf16_img_s"] = 128 / medians["torch-bf16"]
        row["auto_bf16_img_s"] = 128 / medians["d3jax-auto-bf16"]
        row["auto_bf16_vs_torch_bf16"] = medians["torch-bf16"] / medians["d3jax-auto-bf16"]
        row["auto_bf16_vs_auto_f32"] = medians["d3jax-auto"] / medians["d3jax-auto-bf16"]
        if scan_steps:
          row["scan_auto_bf16_img_s"] = 128 * scan_steps / medians["d3jax-scan-auto-bf16"]
          row["scan_auto_bf16_vs_scan_auto_f32"] = (medians["d3jax-scan-auto"]
                                                   / medians["d3jax-scan-auto-bf16"])
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def bench_eval(rounds: int) -> list[dict]:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
  t_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  mean = torch.tensor(NORM.mean).view(1, 3, 1, 1)
  std = torch.tensor(NORM.std).view(1, 3, 1, 1)
  rows = []
  for name, width in (("small_cnn", 32), ("preact_resnet18", 64)):
    model = get_model(name, 10, width=width)
    variables = train.init_variables(model, (32, 32, 3), jax.random.key(0))
    t_model = torch_model(name, width).eval()

    def jax_eval():
      train.predict_logits(model, variables, images, NORM, batch_size=500)

    def torch_eval():
      with torch.no_grad():
        for chunk in torch.split(t_images, 500):
          x = ((chunk.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
          t_model(x)

    medians = interleaved({"d3jax": jax_eval, "torch": torch_eval}, rounds, 1)
    row = {"model": name, "d3jax_img_s": 1000 / medians["d3jax"],
           "torch_img_s": 1000 / medians["torch"], "ratio": medians["torch"] / medians["d3jax"]}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def bench_grid(rounds: int, sizes: dict[str, tuple[int, ...]]) -> list[dict]:
  settings = {"small_cnn": dict(width=16, shape=(28, 28, 1), n=200, batch=32),
              "preact_resnet18": dict(width=64, shape=(32, 32, 3), n=256, batch=128)}
  rows = []
  for name, grid_sizes in sizes.items():
    s = settings[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (s["n"],) + s["shape"], dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, s["n"]).astype(np.int32))
    channels = s["shape"][-1]
    norm = train.Normalization((0.5,) * channels, (0.25,) * channels)
    model = get_model(name, 10, width=s["width"])
    program = train.Program(model, recipe("d3", s["batch"]), norm)
    variables = train.init_variables(model, s["shape"], jax.random.key(0))
    single = {"state": train.init_state(program, variables, s["n"], jax.random.key(1))}

    def one_run_epoch():
      single["state"], metrics = train.train_epoch(program, single["state"], x, y)
      metrics["loss"].block_until_ready()

    for size in grid_sizes:
      axes = train.grid_axes()
      hparams = {k: jnp.broadcast_to(v, (size,)) for k, v in program.hyperparams().items()}
      hparams["lmd"] = jnp.linspace(0.5, 20.0, size)
      sides, compile_s = {"one": one_run_epoch}, {}
      for label, width in (("vmap", None), ("scan", 1)):
        grid = {"state": init_grid(program, axes, variables, s["n"], jax.random.key(1), hparams)}

        def grid_epoch(grid=grid, width=width):
          grid["state"], metrics = train.train_epoch(program, grid["state"], x, y, axes, width)
          metrics["loss"].block_until_ready()

        start = time.perf_counter()
        grid_epoch()
        compile_s[label] = time.perf_counter() - start
        sides[label] = grid_epoch
      medians = interleaved(sides, rounds, 1)
      row = {"model": name, "G": size, "one_by_one_epoch_s": size * medians["one"],
             "one_img_s": s["n"] / medians["one"]}
      for label in ("vmap", "scan"):
        row.update({f"{label}_epoch_s": medians[label],
                    f"{label}_ratio": medians[label] / (size * medians["one"]),
                    f"{label}_compile_s": compile_s[label]})
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def machine() -> dict:
  model_name = next((line.split(":", 1)[1].strip() for line in
                     subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Model name")), platform.processor())
  return {"cpu": model_name, "jax": jax.__version__, "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "backend": jax.default_backend()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", default="steps,eval,grid")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
  parser.add_argument("--lax-models", default="small_cnn",
                      help="models whose step is also timed with XLA's own convolution")
  parser.add_argument("--step-models", default="small_cnn,preact_resnet18",
                      help="models whose steps are timed")
  parser.add_argument("--scan-steps", type=int, default=0,
                      help="also time K d3jax steps inside one lax.scan (the engine's epoch form)")
  parser.add_argument("--grid-small", default="1,4,8", help="grid sizes for the small CNN")
  parser.add_argument("--grid-resnet", default="1,4", help="grid sizes for PreAct-ResNet18")
  parser.add_argument("--bf16", action="store_true",
                      help="steps section: add d3jax precision='bf16' and PyTorch autocast-bf16 sides")
  parser.add_argument("--json", default=None, help="write every row here")
  args = parser.parse_args()
  results = {"machine": machine()}
  print(json.dumps(results["machine"]), flush=True)
  sections = args.sections.split(",")
  if "steps" in sections:
    results["steps"] = bench_steps(args.rounds, args.steps, tuple(args.lax_models.split(",")),
                                   tuple(args.step_models.split(",")), args.scan_steps, args.bf16)
  if "eval" in sections:
    results["eval"] = bench_eval(args.rounds)
  if "grid" in sections:
    sizes = {"small_cnn": tuple(int(g) for g in args.grid_small.split(",") if g),
             "preact_resnet18": tuple(int(g) for g in args.grid_resnet.split(",") if g)}
    results["grid"] = bench_grid(args.rounds, {k: v for k, v in sizes.items() if v})
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
