"""Convolution lowering of the input-aware attack's generators on this backend: "lax" vs "im2col".

Times, interleaved in one process (medians of 7 rounds after warm-up), the generator of
:class:`d3jax.attacks.input_aware.InputAwareConfig` (width 32, 3 scales) at batch 128: a single
jitted training pass (forward and backward) and eval-mode forward pass, for MNIST (28×28×1) and
CIFAR-10 (32×32×3) images, then (MNIST only, 2 rounds) the way the attack really trains it: 3
gradient steps inside one ``lax.scan``. Prints seconds per batch (per scan) and the im2col / lax
ratio (> 1: lax is faster).

Run:  .venv/bin/python benchmarks/generator_lowering.py
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from d3jax.attacks.input_aware import Generator, threshold
from timing import interleaved

ROUNDS = 7


def programs(conv: str, x: jax.Array) -> dict:
  """The jitted training pass and eval forward pass of one lowering, with their arguments."""
  net = Generator(x.shape[-1], conv=conv)
  variables = net.init(jax.random.key(1), x[:2])

  @jax.jit
  def train_pass(params, stats, x):
    def loss(params):
      out, updated = net.apply({"params": params, "batch_stats": stats}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.mean(threshold(out)), updated
    return jax.value_and_grad(loss, has_aux=True)(params)

  @jax.jit
  def eval_pass(variables, x):
    return net.apply(variables, x, train=False)

  return {"train fwd+bwd": (train_pass, (variables["params"], variables["batch_stats"], x)),
          "eval fwd": (eval_pass, (variables, x))}


def scanned(conv: str, xs: jax.Array):
  """3 SGD steps of the generator's training pass inside one jitted ``lax.scan``."""
  net = Generator(xs.shape[-1], conv=conv)
  variables = net.init(jax.random.key(1), xs[0, :2])

  def step(params, x):
    def loss(params):
      out, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         train=True, mutable=["batch_stats"])
      return jnp.mean(threshold(out))
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss)(params)), None

  return jax.jit(lambda params, xs: jax.lax.scan(step, params, xs)[0]), (variables["params"], xs)


def timed(fn: Callable, args: tuple) -> Callable[[], object]:
  """A side for :func:`timing.interleaved`: one blocking call of ``fn(*args)``."""
  return lambda: jax.block_until_ready(fn(*args))


def report(shape: str, what: str, seconds: dict[str, float]) -> None:
  print(f"{shape:>8} {what:14} lax {seconds['lax']:.3f} s  im2col {seconds['im2col']:.3f} s  "
        f"im2col/lax {seconds['im2col'] / seconds['lax']:.2f}", flush=True)


def main() -> None:
  for shape in ((28, 28, 1), (32, 32, 3)):
    x = jax.random.normal(jax.random.key(0), (128, *shape))
    sides = {conv: programs(conv, x) for conv in ("lax", "im2col")}
    for what in ("train fwd+bwd", "eval fwd"):
      seconds = interleaved({conv: timed(*progs[what]) for conv, progs in sides.items()}, ROUNDS)
      report("x".join(map(str, shape)), what, seconds)
  xs = jax.random.normal(jax.random.key(0), (3, 128, 28, 28, 1))
  report("28x28x1", "3-step scan",
         interleaved({conv: timed(*scanned(conv, xs)) for conv in ("lax", "im2col")}, rounds=2))


if __name__ == "__main__":
  main()
