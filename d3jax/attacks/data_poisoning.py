"""The data-poisoning attacks by name: the configs of BadNets, Blended and SIG, and the table of
every attack whose backdoor is a pixel-space trigger stamped into a share of the training set
(BadNets, Blended, SIG, LF, SSBA, TrojanNN).

This table sits below the attacks that build on a data-poisoning attack (the adaptive attack
trains one with SAM), so they can look their base attack up without importing the full registry
(:mod:`d3jax.attacks.registry`), which lists them too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from d3jax.attacks.lf import LFConfig
from d3jax.attacks.ssba import SSBAConfig
from d3jax.attacks.triggers import LABEL_MODES, SIG, BadNets, Blended, ImageShape
from d3jax.attacks.trojannn import TrojanNNConfig


@dataclasses.dataclass(frozen=True)
class BadNetsConfig:
  """BadNets: Gu, Dolan-Gavitt & Garg, "BadNets: identifying vulnerabilities in the machine
  learning model supply chain", 2017 (Sec. 4.2's white square), as BackdoorBench configures it:
  a 3×3 white square in the bottom-right corner of 32×32 images.

  Deviation from BackdoorBench: other image sizes get a square of side round(3·min(H, W)/32)
  instead of BackdoorBench's bilinear resize of its 32×32 trigger image (a soft grey frame at
  64×64, a broken 3-channel trigger on MNIST).

  Attributes:
    size: side of the square in pixels; 0 scales 3 px per 32 px of image side.
    value: the pixel value written inside the square.
  """

  size: int = 0
  value: int = 255
  name: ClassVar[str] = "badnets"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
  kind: ClassVar[str] = "poison"
  crafts_on: ClassVar[str] = "nothing"

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> BadNets:
    del clean, target, key
    if self.size < 0:
      raise ValueError(f"BadNets size must be ≥ 0 (0 scales with the image), got {self.size}.")
    return BadNets(image_shape, self.size or None, self.value)


@dataclasses.dataclass(frozen=True)
class BlendedConfig:
  """Blended: Chen, Liu, Li, Lu & Song, "Targeted backdoor attacks on deep learning systems using
  data poisoning", 2017 (Sec. 4.2's blended injection), with BackdoorBench's α = 0.2.

  Deviation from BackdoorBench: its Hello Kitty key image cannot be shipped, so the default key
  is uniform noise from ``seed`` (the paper's other key pattern); ``key_image`` loads any image,
  resized with JAX's antialiased bilinear resize rather than PIL's.

  Attributes:
    alpha: blend weight of the key image.
    key_image: path of the key image; empty: seeded uniform noise.
    seed: seed of the noise key.
  """

  alpha: float = 0.2
  key_image: str = ""
  seed: int = 0
  name: ClassVar[str] = "blended"
  label_modes: ClassVar[tuple[str, ...]] = LABEL_MODES
  kind: ClassVar[str] = "poison"
  crafts_on: ClassVar[str] = "nothing"

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> Blended:
    del clean, target, key
    return Blended(image_shape, self.alpha, self.key_image or None, self.seed)


@dataclasses.dataclass(frozen=True)
class SIGConfig:
  """SIG: Barni, Kallas & Tondi, "A new backdoor attack in CNNs by training set corruption without
  label poisoning", ICIP 2019, with BackdoorBench's Δ = 40, f = 6; clean-label only: only
  target-class training images are poisoned, and a poisoning count larger than the target class
  is an error (BackdoorBench crashes).

  Attributes:
    delta: amplitude of the sinusoid in pixel values.
    frequency: periods across the image width.
  """

  delta: float = 40.0
  frequency: float = 6.0
  name: ClassVar[str] = "sig"
  label_modes: ClassVar[tuple[str, ...]] = SIG.label_modes
  kind: ClassVar[str] = "poison"
  crafts_on: ClassVar[str] = "nothing"

  def trigger(self, image_shape: ImageShape, *, clean=None, target: int = 0,
              key: jax.Array | None = None) -> SIG:
    del clean, target, key
    return SIG(image_shape, self.delta, self.frequency)


POISONING: dict[str, type] = {config.name: config for config in (
    BadNetsConfig, BlendedConfig, SIGConfig, LFConfig, SSBAConfig, TrojanNNConfig)}


def build(table: dict[str, type], name: str, config: dict[str, Any], what: str = "attack") -> Any:
  """The config ``table[name]`` (names are case-insensitive) with the published defaults,
  overridden by ``config``; an unknown name or option is one error listing what is allowed."""
  key = name.lower()
  if key not in table:
    raise ValueError(f"unknown {what} {name!r}; available {what}s: {', '.join(table)}.")
  cls = table[key]
  fields = [field.name for field in dataclasses.fields(cls)]
  unknown = sorted(set(config) - set(fields))
  if unknown:
    raise ValueError(
        f"attack {key!r} has no option {', '.join(map(repr, unknown))}; its options are "
        f"{', '.join(fields) or 'none'}.")
  return cls(**config)
