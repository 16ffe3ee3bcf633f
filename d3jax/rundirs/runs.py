"""Attack and defense run directories: built atomically, with per-epoch curves, loadable alone.

A run directory holds ``config.json`` (the full attack config, the model spec and the dataset
spec, and for a defense its config and reserved-set draw), ``metrics.json`` (the table row and
any warnings), ``metrics.csv`` and ``curves.png`` (per epoch), for an attack ``gallery.png`` (test
images clean | poisoned | magnified residual, with the trigger the model was trained against),
``log.txt``, the orbax checkpoint ``variables/``, the backdoor test set ``backdoor_test.npz``
(uint8 images, labels, true labels; loading a run reads it instead of building the trigger again),
for an attack whose trigger trains with the model (input-aware) the trigger's variables
``trigger/``, and ``manifest.json``. A
defense run embeds what it needs from its attack run (its backdoor test set too), so it loads on
its own, and it stores no path: run directories can be moved.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optax

from d3jax.rundirs import checkpoint, curves
from d3jax.attacks import PoisonedSet
from d3jax.attacks.gallery import pair_row, write_rows
from d3jax.metrics import BackdoorMetrics
from d3jax.workflows import pipeline
from d3jax.workflows.pipeline import (AttackRun, Backdoored, ReservedSplit, accuracy_on, dataset_spec,
                            model_spec, prepare, rebuild, table_row)
from d3jax.engine.train import TrainState, predict_logits

LOG = logging.getLogger("d3jax")
KINDS = ("attack", "defense")
BACKDOOR_TEST = "backdoor_test.npz"  # the backdoor test set, stored since issue 8
GALLERY_IMAGES = 6  # test images in an attack run's gallery.png
TRIGGER = "trigger"  # checkpoint of a trained trigger's variables (input-aware's generators)


def save_backdoor_test(run_dir: Path, backdoor_test: PoisonedSet) -> Path:
  """Writes the backdoor test set (uint8 images, labels, true labels) into ``run_dir``."""
  return checkpoint.save_arrays(Path(run_dir) / BACKDOOR_TEST, backdoor_test._asdict())


def load_backdoor_test(run_dir: Path, image_shape: tuple[int, ...]) -> PoisonedSet | None:
  """The stored backdoor test set of ``run_dir``, or None for runs written before it was stored.

  Raises:
    ValueError: the file is damaged or its images are not uint8 of ``image_shape``.
  """
  path = Path(run_dir) / BACKDOOR_TEST
  if not path.is_file():
    return None
  stored = PoisonedSet(**checkpoint.load_arrays(path, PoisonedSet._fields))
  if stored.x.dtype != np.uint8 or stored.x.shape[1:] != tuple(image_shape) or \
      not len(stored.x) == len(stored.y) == len(stored.is_poison) == len(stored.y_orig):
    raise ValueError(f"{path} holds images {stored.x.dtype} {stored.x.shape} and "
                     f"{len(stored.y)} labels; expected uint8 images of shape (N, "
                     f"{', '.join(map(str, image_shape))}) with N labels, the file is damaged.")
  return stored


@dataclasses.dataclass(frozen=True)
class Tracking:
  """What a run records while it trains.

  Attributes:
    eval_every: measure ACC/ASR/RA on the test sets every this many epochs (and after the
      last); 0 measures only the final model. For evaluation only: never used by training.
    progress: show progress bars.
    checkpoint_every_s: save the training state for ``--resume`` after an epoch when at least
      this many seconds have passed since the last save (and always after the last epoch);
      0 saves after every epoch. An orbax save costs more than a whole epoch of a small
      defense, so saving every epoch would dominate short runs.
  """
  eval_every: int = 1
  progress: bool = True
  checkpoint_every_s: float = 30.0

  def __post_init__(self) -> None:
    if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
      raise ValueError(f"eval_every must be an integer ≥ 0 (0: final model only), got "
                       f"{self.eval_every!r}.")
    if not isinstance(self.checkpoint_every_s, (int, float)) or not self.checkpoint_every_s >= 0:
      raise ValueError(f"checkpoint_every_s must be a number of seconds ≥ 0 (0: every epoch), got "
                       f"{self.checkpoint_every_s!r}.")


class Recorder:
  """The per-epoch callback of a run: one ``metrics.csv`` row and one log line per epoch, then a
  training-state checkpoint (for ``--resume``) when ``tracking.checkpoint_every_s`` has passed
  since the last one, and after the last epoch."""

  def __init__(self, stage: Path, backdoored: Backdoored, epochs: int, tracking: Tracking,
               heldout: tuple[np.ndarray, np.ndarray] | None = None,
               backdoor_test_of: Callable[[TrainState], PoisonedSet] | None = None):
    self.csv = stage / "metrics.csv"
    self.backdoored, self.epochs, self.tracking, self.heldout = backdoored, epochs, tracking, heldout
    self.backdoor_test_of = backdoor_test_of  # for a trigger trained with the model
    self.checkpoints = checkpoint.EpochCheckpoints(stage / "checkpoints")
    self.start = self.last_save = time.perf_counter()

  def restore(self, fresh: TrainState) -> TrainState:
    """The state after the last checkpointed epoch (``fresh`` when there is none); CSV rows of
    later epochs, written before the run was killed, are dropped."""
    latest = self.checkpoints.latest()
    if latest is None:
      curves.keep_epochs(self.csv, 0)
      return fresh
    curves.keep_epochs(self.csv, latest)
    LOG.info("resuming after epoch %d/%d", latest, self.epochs)
    return self.checkpoints.restore(fresh, latest)

  def close(self) -> None:
    self.checkpoints.close()

  def __call__(self, epoch: int, state: TrainState, metrics: dict[str, np.ndarray]) -> None:
    done = epoch + 1
    variables = state.variables
    row: dict[str, Any] = {"epoch": done, "train_loss": float(np.mean(metrics["loss"])),
                           "wall_s": round(time.perf_counter() - self.start, 3)}
    if self.heldout is not None:
      images, labels = self.heldout
      logits = predict_logits(self.backdoored.model, variables, images,
                              self.backdoored.normalization)
      row["heldout_loss"] = float(np.mean(
          optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
      row["heldout_acc"] = float(np.mean(logits.argmax(-1) == labels))
    every = self.tracking.eval_every
    if done == self.epochs or (every and done % every == 0):
      backdoored = self.backdoored
      if self.backdoor_test_of is not None:
        backdoored = dataclasses.replace(backdoored, backdoor_test=self.backdoor_test_of(state))
      row.update(backdoored.measure(variables)._asdict())
    curves.append_row(self.csv, row)
    LOG.info("epoch %d/%d  %s", done, self.epochs, "  ".join(
        f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "wall_s")))
    now = time.perf_counter()
    if done == self.epochs or now - self.last_save >= self.tracking.checkpoint_every_s:
      self.checkpoints.save(done, state)
      self.last_save = now

  def warnings(self, accuracy_on_training_data: float, what: str) -> list[str]:
    """Divergence warnings from the recorded losses and the final training accuracy."""
    losses = [r["train_loss"] for r in curves.read_rows(self.csv)]
    found = [curves.loss_diverged(losses),
             curves.at_chance(accuracy_on_training_data, self.backdoored.dataset.num_classes, what)]
    for warning in filter(None, found):
      LOG.warning("warning: %s", warning)
    return [w for w in found if w]


class Interrupted(KeyboardInterrupt):
  """A run stopped by Ctrl-C or SIGTERM. ``stage`` is its kept staging directory (resumable after
  its last saved epoch), or None when nothing was kept."""

  def __init__(self, out: Path, stage: Path | None):
    super().__init__(f"interrupted while writing {out}")
    self.out, self.stage = out, stage


class RunWriter:
  """Builds a run in its staging directory and renames it into place when complete.

  The output is checked on construction, before any work: an existing ``out`` is refused unless
  ``overwrite``, an input run is never replaced, and a run another process is writing is refused.
  Entering takes the run's exclusive lock (:func:`d3jax.rundirs.checkpoint.lock_run`) before the staging
  directory is touched; exiting releases it. A KeyboardInterrupt (Ctrl-C, or SIGTERM through the
  command line) leaves as :class:`Interrupted`: the staging directory is kept for ``--resume``, or
  removed when the run is not ``resumable`` (a sweep).
  """

  def __init__(self, out: str | Path, *, overwrite: bool = False, resume: bool = False,
               inputs: Sequence[str | Path] = (), resumable: bool = True):
    self.out = checkpoint.check_out(out, overwrite=overwrite, resume=resume, inputs=inputs)
    checkpoint.check_unlocked(self.out)
    self.resume, self.resumable = resume, resumable
    self.stage: Path | None = None
    self._handler: logging.Handler | None = None
    self._level = logging.NOTSET

  def __enter__(self) -> "RunWriter":
    checkpoint.lock_run(self.out)
    try:
      self.stage = checkpoint.begin_run(self.out, resume=self.resume)
    except BaseException:
      checkpoint.unlock_run(self.out)
      raise
    self._handler = logging.FileHandler(self.stage / "log.txt")
    self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    LOG.addHandler(self._handler)
    # Outside the command line nobody sets the "d3jax" logger's level, and Python's default
    # (WARNING) would drop the run's INFO lines before they reach log.txt.
    self._level = LOG.level
    if LOG.getEffectiveLevel() > logging.INFO:
      LOG.setLevel(logging.INFO)
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    LOG.removeHandler(self._handler)
    self._handler.close()
    LOG.setLevel(self._level)
    interrupted = (exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
                   and not isinstance(exc, Interrupted))
    if interrupted and not self.resumable:
      shutil.rmtree(self.stage, ignore_errors=True)
    checkpoint.unlock_run(self.out)
    if interrupted:  # the interrupted epoch is abandoned; saved ones stay for --resume
      raise Interrupted(self.out, self.stage if self.resumable else None) from None

  def start(self, config: dict) -> None:
    """Writes ``config.json``; when resuming, checks it equals the interrupted run's."""
    path = self.stage / "config.json"
    if self.resume:
      stored = checkpoint.load_json(self.stage, "config.json")
      if stored != json.loads(json.dumps(checkpoint.to_json(config, "config"))):
        raise ValueError(f"--resume: the settings differ from those of the interrupted run of "
                         f"{self.out} ({path}); resume with the same settings or start afresh.")
      return
    checkpoint.save_json(path, config)

  def finish(self, variables: Any, metrics: dict, title: str,
             backdoored: Backdoored | None = None) -> Path:
    """Saves the run and renames it into place; with ``backdoored``, also its backdoor test set
    (and a trained trigger's variables), so loading the run does not build the trigger again."""
    config = checkpoint.load_json(self.stage, "config.json")
    checkpoint.save_run(self.stage, variables, config=config, metrics=metrics)
    if backdoored is not None:
      save_backdoor_test(self.stage, backdoored.backdoor_test)
      if backdoored.trigger_variables is not None:
        checkpoint.save_variables(self.stage, backdoored.trigger_variables, TRIGGER)
      if config["kind"] == "attack":
        write_trigger_gallery(backdoored, self.stage / "gallery.png")
    curves.plot(self.stage / "metrics.csv", self.stage / "curves.png", title)
    LOG.removeHandler(self._handler)
    self._handler.close()
    return checkpoint.finish_run(self.stage, self.out)


def write_trigger_gallery(backdoored: Backdoored, path: str | Path) -> None:
  """A PNG of the first test images clean | poisoned | magnified residual, with the trigger of
  ``backdoored`` (a trained trigger too; the model's variables are not needed)."""
  pairs = backdoored.gallery_pairs(GALLERY_IMAGES)
  write_rows([pair_row(backdoored.run.attack, *pairs)], str(path))


def attack_config(run: AttackRun, backdoored: Backdoored) -> dict:
  return {"kind": "attack", "attack": run.to_json(),
          "model": model_spec(run, backdoored.dataset),
          "dataset": dataset_spec(run, backdoored.dataset)}


@dataclasses.dataclass
class LoadedRun:
  """A run directory read back: its config, metrics and model (with the data to measure it)."""
  path: Path
  config: dict
  metrics: dict
  backdoored: Backdoored  # .variables holds the run's own variables (defended, for a defense)

  @property
  def kind(self) -> str:
    return self.config["kind"]

  def measure(self) -> dict:
    """Re-measures the run's model: its table row."""
    measured = self.backdoored.measure(self.backdoored.variables)
    run = self.backdoored.run
    if self.kind == "attack":
      return table_row(run.attack, "none", measured)
    before = BackdoorMetrics(**self.config["baseline"])
    return table_row(run.attack, self.config["defense"]["name"], measured, before)


def is_sweep(run_dir: str | Path) -> bool:
  """Whether ``run_dir`` holds a finished `d3jax sweep` run (read without checking it)."""
  config = Path(run_dir) / "config.json"
  return config.is_file() and json.loads(config.read_text()).get("kind") == "sweep"


def load(run_dir: str | Path) -> LoadedRun:
  """Reads a finished run after checking its manifest and that its dataset is unchanged.

  Raises:
    FileNotFoundError: no such directory.
    ValueError: the run is unfinished, damaged or edited, its dataset changed, or its config
      is not one d3jax writes.
  """
  path = checkpoint.verify_run(run_dir)
  config = checkpoint.load_json(path, "config.json")
  if isinstance(config, dict) and config.get("kind") == "sweep":
    raise ValueError(f"{path} is a sweep run, with one table row per configuration and no single "
                     "model: `d3jax show` prints it; pass an attack or defense run here.")
  if not isinstance(config, dict) or config.get("kind") not in KINDS:
    raise ValueError(f"{path / 'config.json'} has no 'kind' of {KINDS}; it was not written by "
                     "d3jax attack or defend.")
  run = AttackRun.from_json(config.get("attack"))
  image_shape = (config.get("model") or {}).get("image_shape") or ()
  backdoored = rebuild(run, lambda like: checkpoint.load_variables(path, like),
                       backdoor_test=load_backdoor_test(path, tuple(image_shape)))
  spec = dataset_spec(run, backdoored.dataset)
  if spec != config.get("dataset"):
    changed = [k for k in spec if spec[k] != (config.get("dataset") or {}).get(k)]
    raise ValueError(f"the dataset of run {run_dir} ({run.dataset}) differs from the one it was "
                     f"made with ({', '.join(changed)} changed); restore the original data.")
  return LoadedRun(path, config, checkpoint.load_json(path, "metrics.json"), backdoored)


def load_trigger(loaded: LoadedRun) -> Any:
  """The trained trigger of an attack run whose trigger trains with the model (input-aware),
  from the generator variables saved in the run.

  Raises:
    ValueError: the run's attack has no trained trigger.
  """
  run = loaded.backdoored.run
  config = run.attack_config()
  if not getattr(config, "trained_trigger", False):
    raise ValueError(f"the {run.attack} attack has no trained trigger to load; only input_aware "
                     "trains its trigger with the model.")
  dataset = loaded.backdoored.dataset
  variables = checkpoint.load_variables(loaded.path, config.variables_like(dataset.image_shape[-1]),
                                        TRIGGER)
  return config.trained(dataset.image_shape, loaded.backdoored.normalization, variables)


def training_accuracy(backdoored: Backdoored, variables: Any, images: np.ndarray,
                      labels: np.ndarray) -> float:
  """Accuracy on (at most 2,000 of) the images the model was trained on, for the chance check."""
  return accuracy_on(backdoored, variables, images[:2000], labels[:2000])


def write_attack(run: AttackRun, out: str | Path, *, overwrite: bool = False, resume: bool = False,
                 tracking: Tracking = Tracking()) -> tuple[LoadedRun, dict]:
  """Trains the attack ``run`` into the run directory ``out``; returns it and its table row.

  With ``resume``, continues the interrupted run of ``out`` after its last finished epoch.
  """
  writer = RunWriter(out, overwrite=overwrite, resume=resume)
  start = time.perf_counter()
  prepared = prepare(run, progress=tracking.progress)  # bad data fails here, before any write
  dataset, model, poisoned, backdoor_test = prepared
  with writer:
    shell = Backdoored(run, dataset, model, None, backdoor_test)
    writer.start(attack_config(run, shell))
    def trained(state):  # the trigger trains with the model (input-aware)
      return pipeline.trained_backdoor_test(
          run, dataset, pipeline.trained_trigger(run, dataset, model, state))
    recorder = Recorder(writer.stage, shell, run.train.epochs, tracking,
                        backdoor_test_of=trained if backdoor_test is None else None)
    try:
      backdoored = pipeline.attack(run, progress=tracking.progress, callback=recorder,
                                   restore=recorder.restore, prepared=prepared)
    finally:
      recorder.close()
    warnings = recorder.warnings(
        training_accuracy(backdoored, backdoored.variables, poisoned.x, poisoned.y),
        "its poisoned training set")
    row = table_row(run.attack, "none", backdoored.baseline)
    metrics = {**row, "warnings": warnings, "wall_time_s": time.perf_counter() - start}
    path = writer.finish(backdoored.variables, metrics, f"attack {run.attack}", backdoored)
  return LoadedRun(path, checkpoint.load_json(path, "config.json"), metrics, backdoored), row


def write_defense(source: LoadedRun, name: str, config: Any, split: ReservedSplit,
                  out: str | Path, *, overwrite: bool = False, resume: bool = False,
                  tracking: Tracking = Tracking()) -> tuple[Path, list[dict]]:
  """Defends the attack run ``source`` with defense ``name`` into ``out``.

  With ``resume``, continues the interrupted run of ``out`` after its last finished epoch.
  Returns the run path and the table rows before and after the defense.
  """
  if source.kind != "attack":
    raise ValueError(f"--attack-run {source.path} is a {source.kind} run; pass a run written by "
                     "`d3jax attack`.")
  writer = RunWriter(out, overwrite=overwrite, resume=resume, inputs=[source.path])
  start = time.perf_counter()
  backdoored = source.backdoored
  (images, labels), heldout = split.draw(backdoored.dataset)
  with writer:
    before = table_row(backdoored.run.attack, "none", backdoored.baseline)
    writer.start({**{k: source.config[k] for k in ("attack", "model", "dataset", "imported")
                     if k in source.config},
                  "kind": "defense", "defense": {"name": name, "config": dataclasses.asdict(config)},
                  "reserved": dataclasses.asdict(split),
                  "baseline": backdoored.baseline._asdict()})
    recorder = Recorder(writer.stage, backdoored, config.epochs, tracking, heldout)
    try:
      variables, _ = pipeline.defend_model(backdoored, name, config, images, labels,
                                           seed=split.seed, progress=tracking.progress,
                                           callback=recorder, restore=recorder.restore)
    finally:
      recorder.close()
    warnings = recorder.warnings(training_accuracy(backdoored, variables, images, labels),
                                 "its reserved training data")
    row = table_row(backdoored.run.attack, name, backdoored.measure(variables), backdoored.baseline)
    metrics = {**row, "warnings": warnings, "wall_time_s": time.perf_counter() - start}
    path = writer.finish(variables, metrics, f"{backdoored.run.attack} → {name}",
                         dataclasses.replace(backdoored, trigger_variables=None))
  return path, [before, row]
