"""SSBA, sample-specific backdoor attack: Li, Li, Wu, Li, He & Lyu, "Invisible backdoor attack
with sample-specific triggers", ICCV 2021 (Sec. 3.3).

A StegaStamp-style encoder (Tancik, Mildenhall & Ng, "StegaStamp: invisible hyperlinks in
physical photographs", CVPR 2020) learns to hide a bit string in an image as a small residual that
a decoder can read back; the trigger is the encoder with ONE fixed string, so every image gets its
own invisible residual. Encoder and decoder are trained here, in JAX, on the attacker's clean
images with random strings: loss = BCE(decoder(clip(x + r)), bits) + w·mean(r²), with the L2
weight w ramped linearly from 0 over the first half of training (StegaStamp's ramp).
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3jax.attacks.clean import CleanModel, unit
from d3jax.attacks.poison import Replacement
from d3jax.attacks.triggers import LABEL_MODES, ImageShape, _check_batch, _image_shape
from d3jax.data.dataset import Dataset, validate_images
from d3jax.models.conv import Conv


class StegaEncoder(nn.Module):
  """(image in [0, 1], bits) → residual: the bits go through a Dense layer to a quarter-resolution
  map, are upsampled (nearest) to the image size and concatenated with it, then 3×3 convs."""
  width: int = 32

  @nn.compact
  def __call__(self, images: jax.Array, bits: jax.Array) -> jax.Array:
    n, height, width, channels = images.shape
    small = (max(1, height // 4), max(1, width // 4))
    code = nn.relu(nn.Dense(small[0] * small[1] * channels, name="code")(bits - 0.5))
    code = jax.image.resize(code.reshape(n, *small, channels), (n, height, width, channels), "nearest")
    x = jnp.concatenate([images - 0.5, code], axis=-1)
    for index in range(3):
      x = nn.relu(Conv(self.width, (3, 3), name=f"conv{index}")(x))
    return Conv(channels, (1, 1), name="residual")(x)


class StegaDecoder(nn.Module):
  """image in [0, 1] → logits of the bits: strided 3×3 convs, global average pool, Dense."""
  bits: int
  width: int = 32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images - 0.5
    for index, (features, stride) in enumerate([(self.width, 2), (2 * self.width, 2), (2 * self.width, 1)]):
      x = nn.relu(Conv(features, (3, 3), strides=stride, name=f"conv{index}")(x))
    return nn.Dense(self.bits, name="bits")(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class SSBAConfig:
  """SSBA (Li et al., ICCV 2021) with a StegaStamp-style encoder trained in JAX.

  Deviations from BackdoorBench (which ships no arrays and trains the original TensorFlow
  StegaStamp at 128 px for 20 epochs with LPIPS and critic losses, then encodes a BCH-coded
  string): the networks are small and trained at the images' own size with only the bit and L2
  losses, for ``steps`` Adam steps; the fixed string is ``bits`` random bits from ``seed``, not
  BCH-coded (nothing decodes it but the backdoored model).

  Pre-generated images, as BackdoorBench uses them: ``train_file`` and ``test_file`` name .npy
  (or single-array .npz) files of uint8 (N, H, W, C) images aligned with the dataset's training
  and test order; poisoning sample i then takes row i, and no encoder is trained.

  Attributes:
    bits: length of the hidden string (BackdoorBench: 100).
    width: channels of the encoder and decoder convs.
    steps: Adam steps of encoder/decoder training.
    batch_size: images per step.
    learning_rate: Adam's learning rate.
    l2_weight: final weight of the residual's mean square.
    seed: seed of the fixed string.
    train_file: pre-generated poisoned training images (with ``test_file``); empty: train the
      encoder.
    test_file: pre-generated poisoned test images.
  """

  bits: int = 100
  width: int = 32
  steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 1e-3
  l2_weight: float = 2.0
  seed: int = 0
  train_file: str = ""
  test_file: str = ""
  name: ClassVar[str] = "ssba"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
  kind: ClassVar[str] = "poison"
  crafts_on: ClassVar[str] = "images"

  def __post_init__(self) -> None:
    for field in ("bits", "width", "steps", "batch_size"):
      if getattr(self, field) < 1:
        raise ValueError(f"SSBA {field} must be ≥ 1, got {getattr(self, field)}.")
    if not self.learning_rate > 0 or self.l2_weight < 0:
      raise ValueError(
          f"SSBA learning_rate must be > 0 and l2_weight ≥ 0, got {self.learning_rate} and {self.l2_weight}.")
    if bool(self.train_file) != bool(self.test_file):
      raise ValueError("SSBA train_file and test_file go together: pass both pre-generated files "
                       f"or neither, got {self.train_file!r} and {self.test_file!r}.")
    for field in ("train_file", "test_file"):
      if getattr(self, field):
        object.__setattr__(self, field, os.path.abspath(getattr(self, field)))

  @property
  def pregenerated(self) -> bool:
    """Whether poisoned images come from ``train_file``/``test_file`` instead of an encoder."""
    return bool(self.train_file)

  def load_pregenerated(self, dataset: Dataset) -> tuple[Replacement, Replacement]:
    """The pre-generated (train, test) images as :class:`Replacement` triggers, checked against
    ``dataset``'s images (same shapes, uint8)."""
    return tuple(Replacement(_read_images(path, clean.shape, what), "ssba")  # type: ignore[return-value]
                 for path, clean, what in ((self.train_file, dataset.x_train, "train_file"),
                                           (self.test_file, dataset.x_test, "test_file")))

  def trigger(self, image_shape: ImageShape, *, clean: CleanModel | None = None, target: int = 0,
              key: jax.Array | None = None) -> "Encoded":
    """Trains the encoder on ``clean.images`` (its model and variables are not used) and returns
    the trigger."""
    del target
    image_shape = _image_shape(image_shape)
    if clean is None or key is None:
      raise ValueError("SSBA trains its encoder on clean images: pass clean=CleanModel(...) and a key.")
    validate_images(clean.images, "SSBA clean images")
    if clean.images.shape[1:] != image_shape:
      raise ValueError(
          f"SSBA: the clean images have shape {clean.images.shape[1:]} but the trigger is built for "
          f"{image_shape}; pass images of the attacked dataset.")
    params, _ = train_encoder(self, clean.images, key)
    return Encoded(image_shape, params, self.secret(), self.width)

  def secret(self) -> np.ndarray:
    """The fixed bit string (float32 zeros and ones)."""
    return np.asarray(jax.random.bernoulli(jax.random.key(self.seed), 0.5, (self.bits,)), np.float32)


def _read_images(path: str, shape: tuple[int, ...], what: str) -> np.ndarray:
  """The uint8 array of ``shape`` in the .npy or single-array .npz ``path`` (never unpickles)."""
  try:
    with open(path, "rb") as f:
      data = np.load(f, allow_pickle=False)
      if isinstance(data, np.lib.npyio.NpzFile):
        if len(data.files) != 1:
          raise ValueError(f"SSBA {what} {path} must hold one array, found {data.files}.")
        data = data[data.files[0]]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    if str(err).startswith("SSBA"):
      raise
    raise ValueError(f"SSBA {what} {path} cannot be read as .npy/.npz ({err}).") from None
  if data.dtype != np.uint8 or data.shape != tuple(shape):
    raise ValueError(
        f"SSBA {what} {path} holds {data.dtype} images of shape {data.shape}; expected uint8 of "
        f"shape {tuple(shape)}, one poisoned copy per image of the dataset, in its order.")
  return data


def train_encoder(config: SSBAConfig, images: np.ndarray, key: jax.Array) -> tuple[Any, dict[str, float]]:
  """Trains encoder and decoder on uint8 ``images``; returns the encoder params and the final
  bit accuracy and residual RMS (in [0, 1] units) on the last batch."""
  encoder, decoder = StegaEncoder(config.width), StegaDecoder(config.bits, config.width)
  init_key, data_key = jax.random.split(key)
  probe = jnp.zeros((1,) + images.shape[1:], jnp.float32)
  params = {"encoder": encoder.init(init_key, probe, jnp.zeros((1, config.bits)))["params"],
            "decoder": decoder.init(jax.random.fold_in(init_key, 1), probe)["params"]}
  tx = optax.adam(config.learning_rate)
  ramp = max(1, config.steps // 2)
  data = jnp.asarray(images)

  def loss_fn(params, x, bits, weight):
    residual = encoder.apply({"params": params["encoder"]}, x, bits)
    logits = decoder.apply({"params": params["decoder"]}, jnp.clip(x + residual, 0.0, 1.0))
    bit_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, bits))
    square = jnp.mean(residual ** 2)
    accuracy = jnp.mean((logits > 0) == (bits > 0.5))
    return bit_loss + weight * square, (accuracy, jnp.sqrt(square))

  def step(carry, index):
    params, opt_state = carry
    step_key = jax.random.fold_in(data_key, index)
    pick_key, bits_key = jax.random.split(step_key)
    x = unit(data[jax.random.randint(pick_key, (config.batch_size,), 0, data.shape[0])])
    bits = jax.random.bernoulli(bits_key, 0.5, (config.batch_size, config.bits)).astype(jnp.float32)
    weight = config.l2_weight * jnp.minimum(1.0, index / ramp)
    grads, stats = jax.grad(loss_fn, has_aux=True)(params, x, bits, weight)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), stats

  @jax.jit
  def run(params):
    (params, _), (accuracy, rms) = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(config.steps))
    return params, accuracy[-1], rms[-1]

  params, accuracy, rms = run(params)
  return params["encoder"], {"bit_accuracy": float(accuracy), "residual_rms": float(rms)}


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
  """SSBA's trigger: ``trunc(255·clip(x + encoder(x, secret), 0, 1))`` per image.

  Attributes:
    image_shape: (H, W, C) of the images the trigger applies to.
    params: the trained encoder's params.
    secret: the fixed bit string (bits,).
    width: the encoder's width.
  """

  image_shape: ImageShape
  params: Any = dataclasses.field(repr=False)
  secret: np.ndarray = dataclasses.field(repr=False)
  width: int = 32
  name: ClassVar[str] = "ssba"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES

  def __call__(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """Returns the encoded uint8 batch; ``key`` is ignored (the encoder is deterministic)."""
    del key
    images = _check_batch(images, self.image_shape, "SSBA")
    x = unit(images)
    bits = jnp.broadcast_to(jnp.asarray(self.secret), (x.shape[0], len(self.secret)))
    residual = StegaEncoder(self.width).apply({"params": self.params}, x, bits)
    return jnp.floor(jnp.clip(x + residual, 0.0, 1.0) * 255.0).astype(jnp.uint8)
