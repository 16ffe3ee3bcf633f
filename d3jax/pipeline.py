"""End-to-end steps on a named dataset: backdoor a model, defend it, measure it.

Used by the command line, the demo and ``experiments/``. Each step is a plain function with a
JSON-serialisable config, so runs can be written to and read from run directories
(:mod:`d3jax.checkpoint`). The defense step hands the defense only the model and the reserved
clean set; the test sets are used afterwards, for measurement only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from d3jax import checkpoint, metrics
from d3jax.attacks import PoisonedSet, get_trigger, poison_dataset
from d3jax.attacks.training import AttackTrainConfig, train_backdoored
from d3jax.data import Dataset, draw_reserved, load_dataset
from d3jax.defenses import defend
from d3jax.evaluation import evaluate
from d3jax.models import get_model
from d3jax.train import Normalization, init_variables


@dataclasses.dataclass(frozen=True)
class AttackRun:
  """Everything that defines a backdoored model (written to ``config.json``)."""
  dataset: str = "mnist5k"
  model: str = "small_cnn"
  model_options: dict = dataclasses.field(default_factory=dict)
  attack: str = "badnets"
  attack_options: dict = dataclasses.field(default_factory=dict)
  ratio: float = 0.1
  target: int = 0
  label_mode: str = "all2one"
  seed: int = 0
  train: AttackTrainConfig = AttackTrainConfig()

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> "AttackRun":
    data = dict(data)
    data["train"] = AttackTrainConfig(**data.get("train", {}))
    return cls(**data)


@dataclasses.dataclass
class Backdoored:
  """A backdoored model with the data needed to measure it."""
  run: AttackRun
  dataset: Dataset
  model: nn.Module
  variables: Any
  backdoor_test: PoisonedSet

  @property
  def normalization(self) -> Normalization:
    return Normalization(self.dataset.mean, self.dataset.std)

  @functools.cached_property
  def baseline(self) -> metrics.BackdoorMetrics:
    """ACC/ASR/RA of the backdoored model itself (computed once)."""
    return self.measure(self.variables)

  def measure(self, variables: Any) -> metrics.BackdoorMetrics:
    return evaluate(self.model, variables, self.dataset.x_test, self.dataset.y_test,
                    self.backdoor_test, self.normalization)


def prepare(run: AttackRun) -> tuple[Dataset, nn.Module, PoisonedSet, PoisonedSet]:
  """The dataset, the model, the poisoned training set and the backdoor test set of ``run``."""
  dataset = load_dataset(run.dataset, seed=run.seed)
  model = get_model(run.model, dataset.num_classes, **run.model_options)
  trigger = get_trigger(run.attack, dataset.image_shape, **run.attack_options)
  poison_key = jax.random.fold_in(jax.random.key(run.seed), 1)
  train, backdoor_test = poison_dataset(dataset, trigger, ratio=run.ratio, target=run.target,
                                        label_mode=run.label_mode, key=poison_key)
  return dataset, model, train, backdoor_test


def attack(run: AttackRun, *, progress: bool = True) -> Backdoored:
  """Trains a backdoored model as ``run`` describes."""
  dataset, model, train, backdoor_test = prepare(run)
  train_key = jax.random.fold_in(jax.random.key(run.seed), 2)
  variables, _ = train_backdoored(model, train, Normalization(dataset.mean, dataset.std), run.train,
                                  train_key, progress=progress, desc=f"attack {run.attack}")
  return Backdoored(run, dataset, model, variables, backdoor_test)


def save_attack(backdoored: Backdoored, run_dir: str) -> None:
  measured = backdoored.baseline
  checkpoint.save_run(run_dir, backdoored.variables, config={"attack": backdoored.run.to_json()},
                      metrics=measured._asdict())


def load_attack(run_dir: str) -> Backdoored:
  """Rebuilds a saved attack run (data, trigger and model from its config, weights from orbax)."""
  run = AttackRun.from_json(checkpoint.load_json(run_dir, "config.json")["attack"])
  dataset, model, _, backdoor_test = prepare(run)
  like = jax.eval_shape(lambda: init_variables(model, dataset.image_shape, jax.random.key(0)))
  variables = checkpoint.load_variables(run_dir, like)
  return Backdoored(run, dataset, model, variables, backdoor_test)


def reserved_set(dataset: Dataset, ratio: float, seed: int, class_balanced: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The defender's clean data: a seeded draw of ``ratio`` of the clean training set (spec §1.5)."""
  indices = draw_reserved(dataset.y_train, ratio, jax.random.key(seed), class_balanced=class_balanced)
  return dataset.x_train[indices], dataset.y_train[indices]


def defense_row(backdoored: Backdoored, name: str, config: Any = None, *, reserved_ratio: float = 0.05,
                seed: int = 0, progress: bool = True) -> tuple[dict, Any, dict]:
  """Runs defense ``name`` and measures it: (table row, defended variables, defense log)."""
  images, labels = reserved_set(backdoored.dataset, reserved_ratio, seed)
  variables, log = defend(name, backdoored.model, backdoored.variables, images, labels,
                          normalization=backdoored.normalization,
                          key=jax.random.fold_in(jax.random.key(seed), 3), config=config,
                          progress=progress)
  row = table_row(backdoored.run.attack, name, backdoored.measure(variables), backdoored.baseline)
  return row, variables, log


def table_row(attack_name: str, defense_name: str, measured: metrics.BackdoorMetrics,
              before: metrics.BackdoorMetrics | None = None) -> dict:
  """A results row ``{attack, defense, acc, asr, ra, der}`` (fractions; der None for "none")."""
  der = None if before is None else metrics.der(before.acc, before.asr, measured.acc, measured.asr)
  return {"attack": attack_name, "defense": defense_name, "acc": measured.acc, "asr": measured.asr,
          "ra": measured.ra, "der": der}


def format_table(rows: list[dict]) -> str:
  """Rows as a Table-1-style text table, in percent."""
  lines = [f"{'attack':<10} {'defense':<8} {'ACC':>6} {'ASR':>6} {'RA':>6} {'DER':>6}"]
  for row in rows:
    der = "  N/A" if row["der"] is None else f"{100 * row['der']:6.2f}"
    lines.append(f"{row['attack']:<10} {row['defense']:<8} {100 * row['acc']:6.2f} "
                 f"{100 * row['asr']:6.2f} {100 * row['ra']:6.2f} {der}")
  return "\n".join(lines)
