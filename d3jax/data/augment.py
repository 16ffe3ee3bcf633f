"""Jittable batch augmentation and normalization (BackdoorBench's train transform: random
crop, then an optional flip, after the trigger; they run inside the training step).

Every function is pure, takes a batch (B, H, W, C) of uint8 or float images, and draws all
per-sample randomness from one ``jax.random`` key. ``padding``, ``crop_padding`` and ``flip``
change shapes or the program, so mark them static under ``jax.jit``
(``static_argnames=("crop_padding", "flip")``); the flip probability ``p`` is data.

BackdoorBench's train transform is RandomCrop(H×W, padding=4, zero fill) for every dataset,
followed by RandomHorizontalFlip(0.5) only for CIFAR-10, both applied after the trigger.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def crop_at(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each side by ``padding`` and crops H×W at per-sample ``offsets``.

  Args:
    images: (B, H, W, C).
    offsets: (B, 2) integer (row, column) offsets into the padded image, each in
      [0, 2 * padding]; ``offsets == padding`` returns the image unchanged.
    padding: static, non-negative pad width.

  Returns:
    (B, H, W, C) with the dtype of ``images``.
  """
  images = jnp.asarray(images)
  _, h, w, c = images.shape
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  padded = jnp.pad(images, pad)
  offsets = jnp.asarray(offsets, jnp.int32)

  def crop_one(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop_one)(padded, offsets)


def random_crop(images: jax.Array, key: jax.Array, padding: int = 4) -> jax.Array:
  """torchvision ``RandomCrop(size=(H, W), padding=padding)`` with constant 0 fill, per sample.

  Offsets are uniform in [0, 2 * padding] for rows and columns independently.
  """
  if padding < 0:
    raise ValueError(f"padding must be non-negative, got {padding}.")
  images = jnp.asarray(images)
  if padding == 0:
    return images
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * padding + 1)
  return crop_at(images, offsets, padding)


def random_flip(images: jax.Array, key: jax.Array, p: float | jax.Array = 0.5) -> jax.Array:
  """Mirrors each image left-right with probability ``p`` (``RandomHorizontalFlip(p)``)."""
  images = jnp.asarray(images)
  flips = jax.random.bernoulli(key, p, (images.shape[0],))
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def augment(images: jax.Array, key: jax.Array, *, crop_padding: int = 4,
            flip: bool = False) -> jax.Array:
  """BackdoorBench's train-time augmentation: random crop, then (optionally) random flip.

  ``crop_padding=0`` disables the crop; ``flip=True`` is BackdoorBench's CIFAR-10 setting.
  The key is always split in two, so turning the flip on or off leaves the crops unchanged.
  """
  crop_key, flip_key = jax.random.split(key)
  images = random_crop(images, crop_key, crop_padding)
  if flip:
    images = random_flip(images, flip_key)
  return images


def normalize(images: jax.Array, mean: Sequence[float] | jax.Array,
              std: Sequence[float] | jax.Array) -> jax.Array:
  """``(x / 255 - mean) / std`` per channel, as float32 (torchvision ToTensor then Normalize)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
