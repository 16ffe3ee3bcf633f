"""A/B of the im2col convolution's backward pass on XLA:CPU.

A: autodiff of ``im2col_conv`` (the input gradient is a col2im: kh·kw padded slices of the patch
gradient summed). B: a custom VJP whose input gradient is itself an im2col convolution of dy with
the flipped, transposed kernel (the transposed convolution; stride 1, padding 1 only). Both sides
are jitted gradients of sum(tanh(conv(x, k))), interleaved in one process, medians of 7 rounds, on
the three 3×3 shapes of PreAct-ResNet18's stride-1 stages at batch 128.

Run:  .venv/bin/python benchmarks/conv_backward_ab.py
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from d3jax.models.conv import im2col_conv, im2col_patches
from timing import interleaved

SAME_3X3 = ((1, 1), (1, 1))


@jax.custom_vjp
def conv_transposed_backward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return im2col_conv(x, kernel, (1, 1), SAME_3X3)


def _forward(x, kernel):
  return conv_transposed_backward(x, kernel), (x, kernel)


def _backward(residuals, dy):
  x, kernel = residuals
  kh, kw, _, cout = kernel.shape
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  dx = im2col_conv(dy, flipped, (1, 1), SAME_3X3)
  patches, _ = im2col_patches(x, (kh, kw), (1, 1), SAME_3X3)
  dk = patches.T @ dy.reshape(-1, cout)
  return dx, dk.reshape(kernel.shape)


conv_transposed_backward.defvjp(_forward, _backward)


def main() -> None:
  autodiff = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.tanh(im2col_conv(x, k, (1, 1), SAME_3X3))),
                              (0, 1)))
  custom = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv_transposed_backward(x, k))), (0, 1)))
  for channels, side in ((64, 32), (128, 16), (256, 8)):
    x = jax.random.normal(jax.random.key(0), (128, side, side, channels))
    kernel = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    a, b = autodiff(x, kernel), custom(x, kernel)
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-3)
    seconds = interleaved({name: lambda fn=fn: jax.block_until_ready(fn(x, kernel))
                           for name, fn in (("autodiff", autodiff), ("custom", custom))}, 7)
    a_ms, b_ms = (1e3 * seconds[name] for name in ("autodiff", "custom"))
    print(f"{channels:4d} ch {side:2d}×{side:<2d}  autodiff {a_ms:7.1f} ms  custom {b_ms:7.1f} ms  "
          f"custom ÷ autodiff {b_ms / a_ms:.2f}", flush=True)


if __name__ == "__main__":
  main()
