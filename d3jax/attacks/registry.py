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
its :class:`d3jax.engine.train.Program`; one whose trigger is trained with the model (input-aware) has
``trained_trigger = True``, and its program's ``trigger(state, image_shape)`` gives the trigger; :func:`d3jax.attacks.training.attack_sets` and
:func:`d3jax.attacks.training.attack_program` pick what every attack trains on and with.
"""
from __future__ import annotations

from typing import Any

from d3jax.attacks.adaptive import AdaptiveConfig
from d3jax.attacks.data_poisoning import POISONING, build
from d3jax.attacks.input_aware import InputAwareConfig
from d3jax.attacks.triggers import ImageShape, Trigger
from d3jax.attacks.wanet import WaNetConfig

_ATTACKS: dict[str, type] = {**POISONING, **{config.name: config for config in (
    WaNetConfig, InputAwareConfig, AdaptiveConfig)}}


def names() -> tuple[str, ...]:
  """The registered attack names."""
  return tuple(_ATTACKS)


def get(name: str, **config: Any) -> Any:
  """The config of attack ``name`` with the published defaults, overridden by ``config``."""
  return build(_ATTACKS, name, config)


def get_trigger(name: str, image_shape: ImageShape, **options: Any) -> Trigger:
  """The trigger of data-poisoning attack ``name`` for images of ``image_shape``, for
  :func:`d3jax.attacks.poison` (an attack that crafts on a clean model raises; build it with
  :func:`d3jax.attacks.training.build_trigger`)."""
  attack = get(name, **options)
  if attack.kind != "poison":
    raise ValueError(
        f"attack {attack.name!r} controls its own training, so poisoning a dataset with its trigger "
        f"is not that attack; data-poisoning attacks: {', '.join(POISONING)}.")
  return attack.trigger(image_shape)
