"""Convolution gradients on XLA:CPU: im2col against XLA's own (YNNPACK) convolutions, per
operation and in a whole PreAct-ResNet18 training step.

    python benchmarks/conv_gradients.py [--parts 128,32,64] [--steps] [--rounds 3]

XLA:CPU hands a forward convolution to YNNPACK, inside ``lax.scan`` too, but not the two
convolutions of its gradient as autodiff writes them (a base-dilated input gradient and a kernel
gradient contracting over the batch): those fall back to XLA's slow native convolution inside a
loop. Written as forward convolutions they stay on YNNPACK:

* input gradient: for stride s, the s² output phases are each a stride-1 correlation of dy with
  the flipped, in/out-swapped sub-kernel ``k[rh::s, rw::s]``, interleaved afterwards (no zeros
  multiplied, no base dilation);
* kernel gradient: a forward convolution of x (batch and channels swapped) with dy as the kernel
  (``"conv"``), or patches of x times dy (``"patches"``).

``--parts`` times, inside a 3-step ``lax.scan``, the forward pass, the input gradient and the
kernel gradient of one 3×3 stride-1 convolution (batch, spatial size, channels) in each form.
``--steps`` times the PreAct-ResNet18 (width 64, batch 128) D3 step, 4 steps per ``lax.scan``,
with the library's im2col lowering and with these gradients patched into it. Both sides of
every comparison are interleaved in one process; medians of ``--rounds`` rounds.
"""
from __future__ import annotations

import argparse
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from d3jax.models import conv as conv_module

import bench
from timing import interleaved

DN = ("NHWC", "HWIO", "NHWC")
LIBRARY_IM2COL = conv_module.im2col_conv  # the library's lowering, before any patching below
Pads = tuple[tuple[int, int], tuple[int, int]]


def forward(x: jax.Array, k: jax.Array, strides=(1, 1), padding: Pads = ((1, 1), (1, 1)),
            rhs_dilation=(1, 1)) -> jax.Array:
  return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=rhs_dilation,
                                      dimension_numbers=DN)


def input_grad(dy: jax.Array, k: jax.Array, x_shape: tuple[int, ...], strides: tuple[int, int],
               padding: Pads) -> jax.Array:
  """dL/dx of ``forward(x, k, strides, padding)`` as s_h·s_w stride-1 forward convolutions."""
  n, h, w, cin = x_shape
  sh, sw = strides
  (low_h, _), (low_w, _) = padding

  def phases(size: int, low: int, stride: int) -> list[tuple[int, int, int, int]]:
    # (first output position, first dy-row index m, count, phase r), in output order
    out = []
    for r in range(stride):
      m = -(-(low - r) // stride)
      first = m * stride + r - low
      out.append((first, m, max(0, -(-(size - first) // stride)), r))
    return sorted(out)

  def phase(sub: jax.Array, m_h: int, c_h: int, m_w: int, c_w: int) -> jax.Array:
    th, tw = sub.shape[:2]
    d, lo_h, lo_w = dy, th - 1 - m_h, tw - 1 - m_w
    if lo_h < 0:
      d, lo_h = d[:, -lo_h:], 0
    if lo_w < 0:
      d, lo_w = d[:, :, -lo_w:], 0
    flipped = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2)
    return forward(d, flipped, (1, 1), ((lo_h, c_h + m_h - dy.shape[1]),
                                        (lo_w, c_w + m_w - dy.shape[2])))

  if strides == (1, 1):
    return phase(k, low_h, h, low_w, w)
  rows_out, cols_out = -(-h // sh), -(-w // sw)
  grid = []
  for _, m_h, c_h, r_h in phases(h, low_h, sh):
    line = []
    for _, m_w, c_w, r_w in phases(w, low_w, sw):
      sub = k[r_h::sh, r_w::sw]
      part = (phase(sub, m_h, c_h, m_w, c_w) if min(sub.shape[:2]) and c_h and c_w
              else jnp.zeros((n, c_h, c_w, cin), dy.dtype))
      line.append(jnp.pad(part, ((0, 0), (0, rows_out - c_h), (0, cols_out - c_w), (0, 0))))
    grid.append(jnp.stack(line, axis=3))
  return jnp.stack(grid, axis=2).reshape(n, rows_out * sh, cols_out * sw, cin)[:, :h, :w]


def kernel_grad(x: jax.Array, dy: jax.Array, k_shape, strides, padding: Pads, how: str) -> jax.Array:
  kh, kw, _, cout = k_shape
  if how == "patches":
    patches = conv_module.im2col_patches(x, (kh, kw), strides, padding)[0]
    return (dy.reshape(-1, cout).T @ patches).T.reshape(k_shape)
  xt = jnp.pad(x, ((0, 0), *padding, (0, 0))).transpose(3, 1, 2, 0)   # (cin, Hp, Wp, N)
  dk = forward(xt, dy.transpose(1, 2, 0, 3), (1, 1), ((0, 0), (0, 0)), rhs_dilation=strides)
  return dk[:, :kh, :kw].transpose(1, 2, 0, 3)


def ynn_conv(dk_how: str) -> Callable:
  """XLA's forward convolution with both gradients as forward convolutions (see above)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def conv(x, k, strides, padding):
    return forward(x, k, strides, padding)

  def fwd(x, k, strides, padding):
    return forward(x, k, strides, padding), (x, k)

  def bwd(strides, padding, res, dy):
    x, k = res
    return (input_grad(dy, k, x.shape, strides, padding),
            kernel_grad(x, dy, k.shape, strides, padding, dk_how))

  conv.defvjp(fwd, bwd)
  return conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_phase_dx(x, k, strides, padding):
  """d3jax's im2col forward (patches kept for the kernel gradient), input gradient by phases."""
  return _im2col_fwd(x, k, strides, padding)[0]


def _im2col_fwd(x, k, strides, padding):
  kh, kw = k.shape[:2]
  y = LIBRARY_IM2COL(x, k, strides, padding)
  return y, (conv_module.im2col_patches(x, (kh, kw), strides, padding)[0], k, x.shape)


def _im2col_bwd(strides, padding, res, dy):
  p, k, x_shape = res
  return input_grad(dy, k, x_shape, strides, padding), (p.T @ dy.reshape(-1, k.shape[-1])).reshape(k.shape)


im2col_phase_dx.defvjp(_im2col_fwd, _im2col_bwd)


def bench_parts(n: int, size: int, channels: int, rounds: int) -> dict[str, float]:
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (n, size, size, channels))
  dy = jax.random.normal(keys[1], (n, size, size, channels))
  k = 0.05 * jax.random.normal(keys[2], (3, 3, channels, channels))
  pads, one = ((1, 1), (1, 1)), (1, 1)
  parts = {
      "forward, im2col": lambda k, x: LIBRARY_IM2COL(x, k, one, pads),
      "forward, XLA conv": lambda k, x: forward(x, k),
      "input grad, autodiff of im2col": lambda k, x: jax.vjp(
          lambda v: LIBRARY_IM2COL(v, k, one, pads), x)[1](dy)[0],
      "input grad, forward conv": lambda k, x: input_grad(dy, k, x.shape, one, pads),
      "kernel grad, patches": lambda k, x: kernel_grad(x, dy, k.shape, one, pads, "patches"),
      "kernel grad, forward conv": lambda k, x: kernel_grad(x, dy, k.shape, one, pads, "conv"),
  }

  def scanned(fn):  # 3 dependent iterations, so nothing is hoisted out of the loop
    loop = jax.jit(lambda k, x: jax.lax.scan(
        lambda s, _: (s * 1.0001, jnp.sum(fn(k, x + s))), 1.0, None, length=3)[1])
    return lambda: loop(k, x).block_until_ready()

  medians = interleaved({name: scanned(fn) for name, fn in parts.items()}, rounds, 1)
  return {name: 1e3 * t / 3 for name, t in medians.items()}


def bench_steps(rounds: int, scan_steps: int = 4) -> dict[str, float]:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 128).astype(np.int32)
  variants = {"im2col (library)": LIBRARY_IM2COL,
              "XLA conv, kernel grad as conv": ynn_conv("conv"),
              "XLA conv, kernel grad from patches": ynn_conv("patches"),
              "im2col, input grad by phases": im2col_phase_dx}
  sides = {}
  for name, fn in variants.items():
    conv_module.im2col_conv = fn  # read at trace time by the im2col lowering
    try:
      sides[name] = bench.jax_step_fn("preact_resnet18", 64, "d3", "im2col", images, labels,
                                      scan_steps)[0]
    finally:
      conv_module.im2col_conv = LIBRARY_IM2COL
  medians = interleaved(sides, rounds, 1)
  return {name: 128 * scan_steps / t for name, t in medians.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="128,32,64", help="batch,size,channels ('' to skip)")
  parser.add_argument("--steps", action="store_true", help="time whole PreAct-ResNet18 D3 steps")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  print(json.dumps(bench.machine()), flush=True)
  if args.parts:
    n, size, channels = (int(v) for v in args.parts.split(","))
    for name, ms in bench_parts(n, size, channels, args.rounds).items():
      print(f"{name:34s} {ms:8.1f} ms", flush=True)
  if args.steps:
    for name, img_s in bench_steps(args.rounds).items():
      print(f"{name:34s} {img_s:8.1f} img/s", flush=True)


if __name__ == "__main__":
  main()
