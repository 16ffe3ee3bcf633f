"""Why SSBA's backdoor is not learned at this scale: does the StegaStamp-style encoder hide its
bits at all, and how large is the residual it leaves after the uint8 rounding the poisoned images
go through?

Trains encoder + decoder on the mnist5k training images as :func:`d3jax.attacks.ssba.train_encoder`
does (Adam 1e-3, batch 64, 100 random bits per image, the L2 weight ramped linearly from 0 over the
first half), with variants the library does not have: a decoder that flattens its last feature
map into a 512-unit hidden layer instead of average-pooling it (``--decoder flatten``), a residual
bounded to ±``--bound`` grey levels by a scaled tanh, and a straight-through uint8 rounding of the
decoder's input (``--ste``). Prints, on 256 training images with fresh random bits, the decoder's
bit accuracy on the float and on the rounded images and the |poisoned − clean| difference in grey
levels.

Run:  .venv/bin/python experiments/attacks/ssba_probe.py --steps 600 --l2 2.0 [--decoder flatten] [--bound 8] [--ste]
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.attacks.clean import unit
from d3jax.attacks.ssba import StegaDecoder, StegaEncoder
from d3jax.data import load_dataset
from d3jax.models.conv import Conv

BITS, WIDTH, BATCH = 100, 32, 64


class FlattenDecoder(nn.Module):
  """StegaDecoder's strided convs, then flatten → Dense(512) → bits (StegaStamp flattens too)."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images - 0.5
    for index, (features, stride) in enumerate([(WIDTH, 2), (2 * WIDTH, 2), (2 * WIDTH, 1)]):
      x = nn.relu(Conv(features, (3, 3), strides=stride, name=f"conv{index}")(x))
    x = nn.relu(nn.Dense(512)(x.reshape(x.shape[0], -1)))
    return nn.Dense(BITS, name="bits")(x)


def rounded(values: jax.Array) -> jax.Array:
  """What the poisoned uint8 image stores: floor(255·clip(v, 0, 1)) / 255."""
  return jnp.floor(jnp.clip(values, 0.0, 1.0) * 255.0) / 255.0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--l2", type=float, default=2.0, help="final L2 weight (the library's 2.0)")
  parser.add_argument("--decoder", choices=("pool", "flatten"), default="pool")
  parser.add_argument("--bound", type=float, default=0.0, help="±grey levels (0: unbounded)")
  parser.add_argument("--ste", action="store_true", help="straight-through uint8 rounding")
  args = parser.parse_args()
  images = load_dataset("mnist5k").x_train
  encoder = StegaEncoder(WIDTH)
  decoder = StegaDecoder(BITS, WIDTH) if args.decoder == "pool" else FlattenDecoder()

  def residual_of(params, x, bits):
    r = encoder.apply({"params": params["encoder"]}, x, bits)
    return args.bound / 255.0 * jnp.tanh(r) if args.bound else r

  def loss_fn(params, x, bits, weight):
    r = residual_of(params, x, bits)
    y = jnp.clip(x + r, 0.0, 1.0)
    if args.ste:
      y = y + jax.lax.stop_gradient(rounded(y) - y)
    logits = decoder.apply({"params": params["decoder"]}, y)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, bits)) + weight * jnp.mean(r ** 2)

  init_key, data_key = jax.random.split(jax.random.key(0))
  probe = jnp.zeros((1, *images.shape[1:]))
  params = {"encoder": encoder.init(init_key, probe, jnp.zeros((1, BITS)))["params"],
            "decoder": decoder.init(jax.random.fold_in(init_key, 1), probe)["params"]}
  tx, data, ramp = optax.adam(1e-3), jnp.asarray(images), max(1, args.steps // 2)

  def step(carry, index):
    params, opt_state = carry
    pick_key, bits_key = jax.random.split(jax.random.fold_in(data_key, index))
    x = unit(data[jax.random.randint(pick_key, (BATCH,), 0, data.shape[0])])
    bits = jax.random.bernoulli(bits_key, 0.5, (BATCH, BITS)).astype(jnp.float32)
    grads = jax.grad(loss_fn)(params, x, bits, args.l2 * jnp.minimum(1.0, index / ramp))
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  start = time.perf_counter()
  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jnp.arange(args.steps)))(params)
  x = unit(data[:256])
  bits = jax.random.bernoulli(jax.random.key(9), 0.5, (256, BITS)).astype(jnp.float32)
  poisoned = jnp.clip(x + residual_of(params, x, bits), 0.0, 1.0)
  accuracy = {name: float(jnp.mean((decoder.apply({"params": params["decoder"]}, y) > 0) == (bits > 0.5)))
              for name, y in (("float", poisoned), ("rounded", rounded(poisoned)))}
  diff = np.abs(np.asarray(rounded(poisoned)) * 255.0 - images[:256].astype(np.float32))
  print(f"{vars(args)}: bit accuracy float {accuracy['float']:.3f}, rounded {accuracy['rounded']:.3f}; "
        f"|poisoned − clean| grey levels mean {diff.mean():.2f}, rms {np.sqrt(np.mean(diff ** 2)):.2f}, "
        f"max {diff.max():.0f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
