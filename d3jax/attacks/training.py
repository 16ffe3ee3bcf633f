"""Training a (backdoored) model on a poisoned training set with BackdoorBench's recipe
(``config/attack/prototype/cifar10.yaml``).

SGD lr 0.01, momentum 0.9, coupled weight decay 5e-4 on every parameter, cosine annealing
stepped per epoch with T_max = 100 (BackdoorBench hard-codes 100 regardless of the epoch count),
batch 128, mean cross-entropy, train-time random crop (padding 4) after trigger insertion, last
model kept. Every setting is configurable. Deviation: the last partial batch is kept (padded and
masked) instead of dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d3jax.attacks.clean import CleanModel
from d3jax.attacks.poison import PoisonedSet, backdoor_test_set, poison_dataset
from d3jax.attacks.triggers import Trigger
from d3jax.data.dataset import Dataset
from d3jax.engine.train import (EpochCallback, Normalization, Program, Restore, SGDConfig, TrainState,
                         init_variables, train_state)


@dataclasses.dataclass(frozen=True)
class AttackTrainConfig(SGDConfig):
  """BackdoorBench's CIFAR-10 backdoor-training recipe: as FT's, at batch 128."""
  batch_size: int = 128


@dataclasses.dataclass(frozen=True)
class BatchPoisonTraining(AttackTrainConfig):
  """The recipe of an attack whose program poisons part of every batch itself (WaNet,
  input-aware): the classifier's recipe plus the backdoor samples' share, target and label map.
  Subclasses add ``attack`` (their config, with ``label_modes``) and name themselves in ``title``.

  Attributes:
    ratio: share of each batch that is backdoored.
    target: the target class (all2one).
    label_mode: ``"all2one"`` or ``"all2all"`` ((y + 1) mod num_classes).
    num_classes: the number of classes.
  """
  ratio: float = 0.1
  target: int = 0
  label_mode: str = "all2one"
  num_classes: int = 10
  title: ClassVar[str] = "attack"

  def __post_init__(self) -> None:
    super().__post_init__()
    modes = self.attack.label_modes  # type: ignore[attr-defined]
    if self.label_mode not in modes:
      raise ValueError(f"{self.title} supports label_mode {', '.join(modes)}, got {self.label_mode!r}.")
    if not 0 <= self.target < self.num_classes:
      raise ValueError(
          f"{self.title} target must be a class in [0, {self.num_classes}), got {self.target}.")

  def backdoor_labels(self, labels: jax.Array) -> jax.Array:
    """The labels backdoor samples of true ``labels`` are trained with."""
    if self.label_mode == "all2one":
      return jnp.full(labels.shape, self.target, labels.dtype)
    return (labels + 1) % self.num_classes


def train_clean(model: nn.Module, dataset: Dataset, normalization: Normalization,
                config: AttackTrainConfig, key: jax.Array, *, progress: bool = True) -> CleanModel:
  """A clean model trained on ``dataset``'s training set with ``config`` (the attacker's, for
  crafting triggers), with the clean training images."""
  variables, _ = train_backdoored(model, clean_set(dataset), normalization, config, key,
                                  progress=progress, desc="clean model")
  return CleanModel(model, variables, normalization, dataset.x_train, dataset.y_train)


def build_trigger(attack: Any, dataset: Dataset, *, model: nn.Module, normalization: Normalization,
                  config: AttackTrainConfig, target: int, key: jax.Array,
                  clean: CleanModel | None = None, progress: bool = True) -> Trigger | None:
  """The trigger of ``attack`` (a registry config) for ``dataset``. An attack that crafts its
  trigger against a clean model gets ``clean``, or, when that is None, ``model`` trained on the
  clean training set with ``config`` (:func:`train_clean`); one that needs clean images only gets
  the training images. None for an attack whose trigger is trained with the model
  (``trained_trigger``, as input-aware's generators): its program gives it after training; None
  too for pre-generated poisoned images (SSBA's ``train_file``/``test_file``)."""
  if getattr(attack, "trained_trigger", False) or getattr(attack, "pregenerated", False):
    return None
  clean_key, trigger_key = jax.random.split(key)
  if clean is None and attack.crafts_on == "model":
    clean = train_clean(model, dataset, normalization, config, clean_key, progress=progress)
  elif clean is None and attack.crafts_on == "images":
    clean = CleanModel(model, None, normalization, dataset.x_train, dataset.y_train)
  return attack.trigger(dataset.image_shape, clean=clean, target=target, key=trigger_key)


def clean_set(dataset: Dataset) -> PoisonedSet:
  """``dataset``'s training set, unpoisoned, as a :class:`PoisonedSet`."""
  return PoisonedSet(dataset.x_train, dataset.y_train, np.zeros(len(dataset.y_train), bool),
                     dataset.y_train)


def attack_sets(attack: Any, trigger: Trigger | None, dataset: Dataset, *, ratio: float,
                target: int, label_mode: str, key: jax.Array
                ) -> tuple[PoisonedSet, PoisonedSet | None]:
  """What ``attack`` (a registry config) trains on, and its backdoor test set.

  A data-poisoning attack, or a training-controlled one that ``trains_on`` a poisoned set,
  trains on ``dataset`` poisoned with ``trigger`` (:func:`d3jax.attacks.poison_dataset` with
  ``key``); one whose program poisons every batch itself (WaNet) trains on the clean set. The
  backdoor test set is None when the trigger is trained with the model (``trigger`` None).
  Pre-generated poisoned images (``attack.pregenerated``) replace the drawn samples by index.
  """
  if getattr(attack, "pregenerated", False):
    train_images, test_images = attack.load_pregenerated(dataset)
    return poison_dataset(dataset, train_images, ratio=ratio, target=target, label_mode=label_mode,
                          key=key, test_trigger=test_images)
  if attack.kind == "training" and attack.trains_on == "clean":
    if trigger is None:
      return clean_set(dataset), None
    _, test_key = jax.random.split(key)
    return clean_set(dataset), backdoor_test_set(
        dataset.x_test, dataset.y_test, trigger, target=target, label_mode=label_mode,
        num_classes=dataset.num_classes, key=test_key)
  return poison_dataset(dataset, trigger, ratio=ratio, target=target, label_mode=label_mode, key=key)


def attack_program(attack: Any, model: nn.Module, normalization: Normalization,
                   recipe: AttackTrainConfig, *, ratio: float, target: int, label_mode: str,
                   num_classes: int) -> Program:
  """The program that trains ``attack``'s model: the attack's own for a training-controlled attack
  (WaNet's per-batch warping, the adaptive attack's ASAM), plain ``recipe`` otherwise."""
  if attack.kind == "training":
    return attack.program(model, recipe, normalization, ratio=ratio, target=target,
                          label_mode=label_mode, num_classes=num_classes)
  return Program(model, recipe, normalization)


def train_backdoored(model: nn.Module, poisoned: PoisonedSet, normalization: Normalization,
                     config: AttackTrainConfig, key: jax.Array, *, variables: Any = None,
                     progress: bool = True, desc: str = "attack", callback: EpochCallback | None = None,
                     restore: Restore | None = None,
                     program: Program | None = None) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains ``model`` (from fresh variables unless given) on the poisoned set, with ``program``
  (default: plain ``config``; :func:`attack_program` gives an attack's own).

  ``callback`` and ``restore`` are those of :func:`d3jax.engine.train.train` (per-epoch hook, resume).
  Returns the final variables and the per-epoch metrics (``"loss"``: mean training loss).
  """
  state, history = train_backdoored_state(
      model, poisoned, normalization, config, key, variables=variables, progress=progress,
      desc=desc, callback=callback, restore=restore, program=program)
  return state.variables, history


def train_backdoored_state(model: nn.Module, poisoned: PoisonedSet, normalization: Normalization,
                           config: AttackTrainConfig, key: jax.Array, *, variables: Any = None,
                           progress: bool = True, desc: str = "attack",
                           callback: EpochCallback | None = None, restore: Restore | None = None,
                           program: Program | None = None) -> tuple[TrainState, dict[str, np.ndarray]]:
  """:func:`train_backdoored`, returning the final training state (which holds what else the
  program trained, e.g. input-aware's generators)."""
  init_key, train_key = jax.random.split(key)
  if variables is None:
    variables = init_variables(model, poisoned.x.shape[1:], init_key)
  program = Program(model, config, normalization) if program is None else program
  return train_state(program, variables, poisoned.x, poisoned.y, train_key,
                     desc=desc, progress=progress, callback=callback, restore=restore)
