"""Every attack by name: ``names()`` and ``get(name, **config)``.

``get`` returns the attack's frozen config dataclass, holding the published defaults. Every
config has class attributes ``name``, ``label_modes`` (the label modes it is defined for; the
first is its default) and ``kind``: ``"poison"`` for data-poisoning attacks, ``"training"``
for attacks that control training; ``crafts_on`` says what building the trigger needs:
``"nothing"``, the attacker's clean ``"images"`` or a clean ``"model"``.
``config.trigger(image_shape, *, clean=None, target=0, key=None)`` builds the pixel-space trigger
(for a training-controlled attack, the one its backdoor test set uses); attacks that craft on a
clean model or clean images (LF without a pattern file, TrojanNN, SSBA) need ``clean``
(:class:`d3jax.attacks.clean.CleanModel`) and a ``key``;
:func:`d3jax.attacks.training.build_trigger` trains a clean model when one is needed.
A training-controlled config also has ``trains_on`` (``"clean"``: its program poisons every batch
itself, as WaNet's; ``"poisoned"``: it trains on a set poisoned with its trigger, as the adaptive
attack) and ``program(model, recipe, normalization, *, ratio, target, label_mode, num_classes)``,
its :class:`d3jax.train.Program`; one whose trigger is trained with the model (input-aware) has
``trained_trigger = True``, and its program's ``trigger(state, image_shape)`` gives the trigger; :func:`d3jax.attacks.training.attack_sets` and
:func:`d3jax.attacks.training.attack_program` pick what every attack trains on and with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from d3jax.attacks.adaptive import AdaptiveConfig
from d3jax.attacks.input_aware import InputAwareConfig
from d3jax.attacks.lf import LFConfig
from d3jax.attacks.ssba import SSBAConfig
from d3jax.attacks.triggers import LABEL_MODES, SIG, BadNets, Blended, ImageShape, Trigger
from d3jax.attacks.trojannn import TrojanNNConfig
from d3jax.attacks.wanet import WaNetConfig


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


_ATTACKS: dict[str, type] = {config.name: config for config in (
    BadNetsConfig, BlendedConfig, SIGConfig, LFConfig, SSBAConfig, TrojanNNConfig, WaNetConfig,
    InputAwareConfig, AdaptiveConfig)}


def names() -> tuple[str, ...]:
  """The registered attack names."""
  return tuple(_ATTACKS)


def get(name: str, **config: Any) -> Any:
  """The config of attack ``name`` with the published defaults, overridden by ``config``."""
  key = name.lower()
  if key not in _ATTACKS:
    raise ValueError(f"unknown attack {name!r}; available attacks: {', '.join(names())}.")
  cls = _ATTACKS[key]
  fields = [field.name for field in dataclasses.fields(cls)]
  unknown = sorted(set(config) - set(fields))
  if unknown:
    raise ValueError(
        f"attack {key!r} has no option {', '.join(map(repr, unknown))}; its options are "
        f"{', '.join(fields) or 'none'}.")
  return cls(**config)


def get_trigger(name: str, image_shape: ImageShape, **options: Any) -> Trigger:
  """The trigger of data-poisoning attack ``name`` for images of ``image_shape``, for
  :func:`d3jax.attacks.poison` (an attack that crafts on a clean model raises; build it with
  :func:`d3jax.attacks.training.build_trigger`)."""
  attack = get(name, **options)
  if attack.kind != "poison":
    raise ValueError(
        f"attack {attack.name!r} controls its own training, so poisoning a dataset with its trigger "
        f"is not that attack; data-poisoning attacks: "
        f"{', '.join(n for n in names() if get(n).kind == 'poison')}.")
  return attack.trigger(image_shape)
