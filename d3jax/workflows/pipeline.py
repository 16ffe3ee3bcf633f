"""End-to-end steps on a named dataset: backdoor a model, defend it, measure it.

Used by the command line, the demo and ``experiments/``. Each step is a plain function with a
JSON-serialisable config. The defense step hands the defense only the model and the reserved
clean set; the test sets are used afterwards, and per epoch for the curves, for measurement
only. Run directories are written by :mod:`d3jax.rundirs.runs`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Literal, Optional

import flax.linen as nn
import jax
import numpy as np

from d3jax import attacks, metrics
from d3jax.attacks import LABEL_MODES, PoisonedSet
from d3jax.attacks.poison import backdoor_test_rows
from d3jax.attacks.training import (AttackTrainConfig, attack_program, attack_sets, build_trigger,
                                    train_backdoored_state)
from d3jax.data import Dataset, draw_reserved, load_dataset, split_holdout
from d3jax.workflows.evaluation import evaluate
from d3jax.models import MODELS, get_model
from d3jax.defenses import defend
from d3jax.engine.train import (EpochCallback, Normalization, Restore, TrainState, init_variables,
                         predict)


def check_field(ok: bool, field: str, value: Any, allowed: str) -> None:
  """Raises ``ValueError("<field> must be <allowed>, got <value>.")`` unless ``ok``."""
  if not ok:
    raise ValueError(f"{field} must be {allowed}, got {value!r}.")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_fraction(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _dataset_form_ok(spec: Any) -> bool:
  return isinstance(spec, str) and (spec in ("digits", "mnist5k") or (
      spec.startswith(("npz:", "tfds:")) and len(spec.partition(":")[2].strip()) > 0))


@dataclasses.dataclass(frozen=True)
class AttackRun:
  """Everything that defines a backdoored model (written to ``config.json``).

  Attributes:
    dataset: ``digits``, ``mnist5k``, ``npz:<path>`` or ``tfds:<name>`` (see
      :func:`d3jax.data.load_dataset`); an npz path is stored absolute.
    model: a name of :data:`d3jax.models.MODELS`.
    model_options: options of that model, e.g. ``width``.
    attack: a name of the attack registry (:func:`d3jax.attacks.names`). LF (without a pattern
      file) and TrojanNN craft their trigger against a clean model first trained with ``train``;
      SSBA trains its encoder on the clean training images (or reads pre-generated files); WaNet
      trains on the clean set and warps part of every batch; input-aware pre-trains its mask
      generator, then trains its pattern generator with the model on the clean set, triggering
      part of every batch; the adaptive attack trains its base attack with ASAM.
    attack_options: fields of that attack's registry config (:func:`d3jax.attacks.get`), e.g.
      BadNets ``size``, Blended ``alpha``, LF ``max_passes``, adaptive ``base`` and ``rho``.
    ratio: fraction of the training set poisoned, in [0, 1] (WaNet: of every batch).
    target: the target class, in [0, num_classes).
    label_mode: ``all2one``, ``all2all``, ``clean_label`` or ``untargeted``, among those the
      attack supports; None: the attack's default (the first of its ``label_modes``; SIG's is
      ``clean_label``). Untargeted runs report ASR as
      :func:`d3jax.attacks.untargeted_success_rate`.
    seed: seeds the dataset split, the trigger crafting, the poisoning draw and the training.
    train: the training recipe (also the clean model's, for attacks that craft on one).
  """
  dataset: str = "mnist5k"
  model: Literal[MODELS] = "small_cnn"  # type: ignore[valid-type]
  model_options: dict[str, int | bool] = dataclasses.field(default_factory=dict)
  attack: Literal[attacks.names()] = "badnets"  # type: ignore[valid-type]
  attack_options: dict[str, int | float | str] = dataclasses.field(default_factory=dict)
  ratio: float = 0.1
  target: int = 0
  label_mode: Optional[Literal[LABEL_MODES]] = None  # type: ignore[valid-type]
  seed: int = 0
  train: AttackTrainConfig = AttackTrainConfig()

  def __post_init__(self) -> None:
    check_field(_dataset_form_ok(self.dataset), "dataset", self.dataset,
                "'digits', 'mnist5k', 'npz:<path>' or 'tfds:<name>'")
    if self.dataset.startswith("npz:"):
      object.__setattr__(self, "dataset", "npz:" + os.path.abspath(self.dataset[4:]))
    check_field(self.model in MODELS, "model", self.model, f"one of {', '.join(MODELS)}")
    check_field(isinstance(self.model_options, dict), "model_options", self.model_options,
                "a dict of model options")
    get_model(self.model, 10, **self.model_options)  # validates the option names and values
    check_field(isinstance(self.attack, str), "attack", self.attack,
                f"one of {', '.join(attacks.names())}")
    check_field(isinstance(self.attack_options, dict), "attack_options", self.attack_options,
                "a dict of attack options")
    config = self.attack_config()  # validates the name and the option names
    check_field(_is_fraction(self.ratio), "ratio", self.ratio, "a fraction in [0, 1]")
    check_field(_is_int(self.target) and self.target >= 0, "target", self.target,
                "a class index ≥ 0")
    check_field(self.label_mode is None or self.label_mode in config.label_modes, "label_mode",
                self.label_mode, f"one the {config.name} attack supports "
                f"({', '.join(config.label_modes)})")
    check_field(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer ≥ 0")
    check_field(isinstance(self.train, AttackTrainConfig), "train", self.train,
                "an AttackTrainConfig")

  def attack_config(self) -> Any:
    """The attack's registry config with ``attack_options``."""
    return attacks.get(self.attack, **self.attack_options)

  @property
  def mode(self) -> str:
    """The label mode used: ``label_mode``, or the attack's default when that is None."""
    return self.label_mode or self.attack_config().label_modes[0]

  def to_json(self) -> dict:
    """The fields as a JSON-able dict, the label mode resolved (``config.json`` states it)."""
    return {**dataclasses.asdict(self), "label_mode": self.mode}

  @classmethod
  def from_json(cls, data: Any) -> "AttackRun":
    """The inverse of :meth:`to_json`; unknown or mistyped fields raise ValueError."""
    return from_dict(cls, data, "attack")


def from_dict(cls: type, data: Any, where: str) -> Any:
  """Builds the dataclass ``cls`` from a JSON/YAML dict, nested dataclasses included.

  Raises:
    ValueError: ``data`` is not a dict, names a field ``cls`` does not have, or a field's value
      is rejected by the class's own checks.
  """
  if not isinstance(data, dict):
    raise ValueError(f"{where} must be a mapping of {cls.__name__} fields, got {data!r}.")
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has "
                     f"{', '.join(fields)}.")
  values = {}
  for name, value in data.items():
    default = fields[name].default
    if dataclasses.is_dataclass(default) and not isinstance(value, type(default)):
      value = from_dict(type(default), value, f"{where}.{name}")
    values[name] = value
  try:
    return cls(**values)
  except TypeError as err:
    raise ValueError(f"{where}: {err}.") from None


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def dataset_spec(run: AttackRun, dataset: Dataset) -> dict:
  """What identifies the data of a run: the source, its sha256 (npz), shapes and constants."""
  source = run.dataset
  return {"source": source, "seed": run.seed, "num_classes": dataset.num_classes,
          "image_shape": list(dataset.image_shape), "n_train": len(dataset.x_train),
          "n_test": len(dataset.x_test), "mean": list(dataset.mean), "std": list(dataset.std),
          "sha256": file_sha256(source[4:]) if source.startswith("npz:") else None}


def model_spec(run: AttackRun, dataset: Dataset) -> dict:
  """Everything :func:`d3jax.models.get_model` needs to rebuild the model."""
  return {"name": run.model, "num_classes": dataset.num_classes, "options": run.model_options,
          "image_shape": list(dataset.image_shape)}


@dataclasses.dataclass
class Backdoored:
  """A backdoored model with the data needed to measure it."""
  run: AttackRun
  dataset: Dataset
  model: nn.Module
  variables: Any
  backdoor_test: PoisonedSet
  trigger_variables: Any = None  # a trained trigger's variables (input-aware's generators)

  @property
  def normalization(self) -> Normalization:
    return Normalization(self.dataset.mean, self.dataset.std)

  @functools.cached_property
  def baseline(self) -> metrics.BackdoorMetrics:
    """ACC/ASR/RA of the backdoored model itself (computed once)."""
    return self.measure(self.variables)

  def measure(self, variables: Any) -> metrics.BackdoorMetrics:
    """ACC, ASR and RA of ``variables``; an untargeted run's ASR is the untargeted success rate."""
    return evaluate(self.model, variables, self.dataset.x_test, self.dataset.y_test,
                    self.backdoor_test, self.normalization, untargeted=self.run.mode == "untargeted")

  def gallery_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of the backdoor test set and the clean test images they were made
    from (every test image whose label is not the target; every one for all2all and untargeted),
    for a gallery of the trigger the model was trained against (a trained one too)."""
    keep = backdoor_test_rows(self.dataset.y_test, self.run.target, self.run.mode)
    return self.dataset.x_test[keep][:count], np.asarray(self.backdoor_test.x[:count])

  def like(self) -> Any:
    """Shapes and dtypes of the model's variables (for restoring a checkpoint)."""
    return jax.eval_shape(lambda: init_variables(self.model, self.dataset.image_shape,
                                                 jax.random.key(0)))


def data_and_model(run: AttackRun) -> tuple[Dataset, nn.Module]:
  """The dataset and the (untrained) model of ``run``."""
  dataset = load_dataset(run.dataset, seed=run.seed)
  check_field(run.target < dataset.num_classes, "target", run.target,
              f"a class of {dataset.name}, in [0, {dataset.num_classes})")
  return dataset, get_model(run.model, dataset.num_classes, **run.model_options)


def prepare(run: AttackRun, *, progress: bool = True
            ) -> tuple[Dataset, nn.Module, PoisonedSet, PoisonedSet | None]:
  """The dataset, the model, the set the model trains on (poisoned; clean for WaNet and
  input-aware, which poison every batch themselves) and the backdoor test set of ``run`` (None
  when the trigger is trained with the model, as input-aware's: :func:`attack` builds it).

  The trigger is built with :func:`d3jax.attacks.training.build_trigger` (training a clean model
  first for LF and TrojanNN, SSBA's encoder on the clean images), keyed from ``run.seed``.
  """
  dataset, model = data_and_model(run)
  config = run.attack_config()
  key = jax.random.key(run.seed)
  trigger = build_trigger(config, dataset, model=model, normalization=_normalization(dataset),
                          config=run.train, target=run.target, key=jax.random.fold_in(key, 3),
                          progress=progress)
  train, backdoor_test = attack_sets(config, trigger, dataset, ratio=run.ratio, target=run.target,
                                     label_mode=run.mode, key=jax.random.fold_in(key, 1))
  return dataset, model, train, backdoor_test


def attack(run: AttackRun, *, progress: bool = True, callback: EpochCallback | None = None,
           restore: Restore | None = None,
           prepared: tuple[Dataset, nn.Module, PoisonedSet, PoisonedSet] | None = None) -> Backdoored:
  """Trains a backdoored model as ``run`` describes, with the attack's own training program
  (:func:`d3jax.attacks.training.attack_program`: WaNet's, the adaptive attack's ASAM).

  ``callback(epoch, state, metrics)`` runs after every epoch (epoch counted from 0);
  ``restore(fresh_state)`` may return a saved state to continue from (resume); ``prepared``:
  what :func:`prepare` returned for ``run``, so the trigger is not built twice.
  """
  dataset, model, train_set, backdoor_test = prepared or prepare(run, progress=progress)
  state, _ = train_backdoored_state(model, train_set, _normalization(dataset), run.train,
                                    jax.random.fold_in(jax.random.key(run.seed), 2),
                                    progress=progress, desc=f"attack {run.attack}",
                                    callback=callback, restore=restore,
                                    program=_program(run, dataset, model))
  trigger_variables = None
  if backdoor_test is None:
    trigger = trained_trigger(run, dataset, model, state)
    backdoor_test, trigger_variables = trained_backdoor_test(run, dataset, trigger), trigger.variables
  return Backdoored(run, dataset, model, state.variables, backdoor_test, trigger_variables)


def _program(run: AttackRun, dataset: Dataset, model: nn.Module) -> Any:
  return attack_program(run.attack_config(), model, _normalization(dataset), run.train,
                        ratio=run.ratio, target=run.target, label_mode=run.mode,
                        num_classes=dataset.num_classes)


def trained_trigger(run: AttackRun, dataset: Dataset, model: nn.Module, state: TrainState) -> Any:
  """The trigger an attack with ``trained_trigger`` (input-aware) has trained in ``state``."""
  return _program(run, dataset, model).trigger(state, dataset.image_shape)


def trained_backdoor_test(run: AttackRun, dataset: Dataset, trigger: Any) -> PoisonedSet:
  """The backdoor test set of a trained ``trigger`` (it ignores keys)."""
  return attacks.backdoor_test_set(dataset.x_test, dataset.y_test, trigger, target=run.target,
                                   label_mode=run.mode, num_classes=dataset.num_classes)


def _normalization(dataset: Dataset) -> Normalization:
  return Normalization(dataset.mean, dataset.std)


def rebuild(run: AttackRun, variables_from: Callable[[Any], Any], *,
            backdoor_test: PoisonedSet | None = None, progress: bool = False) -> Backdoored:
  """A backdoored model from its config, its weights from ``variables_from(like)``, measured on
  ``backdoor_test`` (a stored one); without it, a crafted trigger is crafted again,
  deterministically from ``run.seed``."""
  if backdoor_test is None:
    dataset, model, _, backdoor_test = prepare(run, progress=progress)
    check_field(backdoor_test is not None, "the stored backdoor test set", None,
                f"present for a {run.attack} run, whose trigger is trained with the model")
  else:
    dataset, model = data_and_model(run)
  partial = Backdoored(run, dataset, model, None, backdoor_test)
  partial.variables = variables_from(partial.like())
  return partial


@dataclasses.dataclass(frozen=True)
class ReservedSplit:
  """How the defender's data is drawn from the clean training set.

  Attributes:
    ratio: fraction of the clean training set reserved for the defender, in (0, 1].
    holdout: fraction of the reserved set held out from training, for the per-epoch held-out
      loss and accuracy that a defender may look at; 0 trains on the whole reserved set.
    class_balanced: draw the same number of samples from every class.
    seed: seeds the draw, the held-out split and the defense.
  """
  ratio: float = 0.05
  holdout: float = 0.1
  class_balanced: bool = False
  seed: int = 0

  def __post_init__(self) -> None:
    check_field(_is_fraction(self.ratio) and self.ratio > 0, "reserved ratio", self.ratio,
                "a fraction in (0, 1]")
    check_field(_is_fraction(self.holdout) and self.holdout < 1, "holdout", self.holdout,
                "a fraction in [0, 1)")
    check_field(isinstance(self.class_balanced, bool), "class_balanced", self.class_balanced,
                "True or False")
    check_field(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer ≥ 0")

  def draw(self, dataset: Dataset) -> tuple[tuple[np.ndarray, np.ndarray],
                                             tuple[np.ndarray, np.ndarray] | None]:
    """(train images, labels) and the held-out (images, labels), or None without a holdout."""
    indices = draw_reserved(dataset.y_train, self.ratio, jax.random.key(self.seed),
                            class_balanced=self.class_balanced)
    if self.holdout == 0:
      return (dataset.x_train[indices], dataset.y_train[indices]), None
    kept, held = split_holdout(indices, self.holdout, jax.random.fold_in(jax.random.key(self.seed), 4))
    return ((dataset.x_train[kept], dataset.y_train[kept]),
            (dataset.x_train[held], dataset.y_train[held]))


def reserved_set(dataset: Dataset, ratio: float, seed: int, class_balanced: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The defender's clean data: a seeded draw of ``ratio`` of the clean training set."""
  return ReservedSplit(ratio, 0.0, class_balanced, seed).draw(dataset)[0]


def check_reserved_shape(images: np.ndarray, backdoored: Backdoored) -> None:
  """A reserved set must have the image shape the model was trained on."""
  shape = tuple(np.shape(images)[1:])
  check_field(shape == backdoored.dataset.image_shape, "reserved set image shape", shape,
              f"the model's input shape {backdoored.dataset.image_shape}")


def defend_model(backdoored: Backdoored, name: str, config: Any, images: np.ndarray,
                 labels: np.ndarray, *, seed: int = 0, progress: bool = True,
                 callback: EpochCallback | None = None, restore: Restore | None = None
                 ) -> tuple[Any, dict]:
  """Runs defense ``name`` on the reserved (images, labels); returns (variables, log)."""
  check_reserved_shape(images, backdoored)
  return defend(name, backdoored.model, backdoored.variables, images, labels,
                normalization=backdoored.normalization, key=jax.random.fold_in(jax.random.key(seed), 3),
                config=config, progress=progress, callback=callback, restore=restore)


def defense_row(backdoored: Backdoored, name: str, config: Any = None, *, reserved_ratio: float = 0.05,
                seed: int = 0, progress: bool = True) -> tuple[dict, Any, dict]:
  """Runs defense ``name`` and measures it: (table row, defended variables, defense log)."""
  images, labels = reserved_set(backdoored.dataset, reserved_ratio, seed)
  variables, log = defend_model(backdoored, name, config, images, labels, seed=seed,
                                progress=progress)
  row = table_row(backdoored.run.attack, name, backdoored.measure(variables), backdoored.baseline)
  return row, variables, log


def accuracy_on(backdoored: Backdoored, variables: Any, images: np.ndarray,
                labels: np.ndarray) -> float:
  """Eval-mode accuracy of ``variables`` on (images, labels)."""
  predicted = predict(backdoored.model, variables, images, backdoored.normalization)
  return metrics.accuracy(predicted, labels)


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
