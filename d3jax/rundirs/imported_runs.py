"""BackdoorBench attack results in, d3jax models out: ``d3jax import`` and ``d3jax export``.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks), whose released checkpoints the D3
paper defends (Sec. 4.1), saves an attack as ``attack_result.pt``, a ``torch.save`` dict with
``model_name``, ``num_classes``, ``img_size``, ``clean_data`` (the dataset's name), ``model`` (the
state dict) and ``bd_test``, the state of its poisoned test set: ``poison_indicator`` (one flag per
clean test image), ``original_index_array`` (the test indices it holds) and ``bd_data_container``,
whose ``data_dict`` maps a test index to ``{"path": <png>, "other_info": [poisoned label, original
label]}``. The poisoned images are lossless PNGs in ``bd_test_dataset/<original label>/<index>.png``
next to ``attack_result.pt``; clean images are not stored, so the clean data comes from a d3jax
dataset (``--dataset``), checked against the result: same test size, classes, image shape, and the
stored original labels equal to the dataset's test labels.

:func:`import_attack_result` turns that into a d3jax attack run directory (``defend``, ``sweep``,
``table``-free commands, ``eval`` and ``analyze`` accept it), the provenance recorded under
``imported`` in its ``config.json``; :func:`export_run` writes a run's model as a PyTorch state dict
in BackdoorBench's parameter names (:mod:`d3jax.interop`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from d3jax import attacks, interop
from d3jax.rundirs import checkpoint, curves, runs
from d3jax.workflows import pipeline
from d3jax.attacks import PoisonedSet
from d3jax.workflows.pipeline import AttackRun, Backdoored

# BackdoorBench model name -> (d3jax model, options it is built with): BackdoorBench's ViT-B/16
# resizes its input to 224×224 (a Sequential(Resize, vit), hence the "1." key prefix).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "preact_resnet18": ("preact_resnet18", {}), "vgg19_bn": ("vgg19_bn", {}),
    "vit_b_16": ("vit_b16", {"resize": 224})}
_KEYS = ("model_name", "num_classes", "model", "bd_test")


@dataclass(frozen=True)
class AttackResult:
  """What d3jax reads from a BackdoorBench ``attack_result.pt`` (module docstring)."""
  path: Path
  model_name: str
  num_classes: int
  image_size: tuple[int, ...] | None
  dataset_name: str | None
  state_dict: dict[str, np.ndarray]
  test_indices: np.ndarray  # int64 (M,): the clean test images the poisoned ones were made from
  poisoned_labels: np.ndarray  # int32 (M,)
  original_labels: np.ndarray  # int32 (M,)
  image_paths: tuple[str, ...]  # the recorded PNG path of each
  test_size: int  # len(poison_indicator): the clean test set's size
  train_poison_ratio: float | None


def _field(mapping: Any, key: str, where: str) -> Any:
  if not isinstance(mapping, dict) or key not in mapping:
    raise ValueError(f"{where} has no {key!r}; is it a BackdoorBench attack_result.pt?")
  return mapping[key]


def read_attack_result(path: str | Path) -> AttackResult:
  """Reads ``attack_result.pt`` (no pickled code is executed; :func:`d3jax.interop.load_torch_checkpoint`).

  Raises:
    ValueError: not an attack result, an unsupported model, or a poisoned test set stored in
      memory instead of as PNG files.
  """
  path = Path(path)
  result = interop.load_torch_checkpoint(path)
  for key in _KEYS:
    _field(result, key, str(path))
  model_name = str(result["model_name"])
  if model_name not in MODELS:
    raise ValueError(f"{path}: model {model_name!r} has no d3jax counterpart; supported: "
                     f"{', '.join(MODELS)}.")
  bd_test = result["bd_test"]
  where = f"{path} bd_test"
  data = _field(_field(bd_test, "bd_data_container", where), "data_dict", where)
  indices = np.asarray(_field(bd_test, "original_index_array", where), np.int64)
  indicator = np.asarray(_field(bd_test, "poison_indicator", where))
  labels, paths = [], []
  for index in indices:
    entry = data.get(int(index)) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or "other_info" not in entry:
      raise ValueError(f"{where}: test index {int(index)} has no stored PNG entry (BackdoorBench "
                       "keeps poisoned images on disk; an in-memory bd_test cannot be imported).")
    labels.append([int(v) for v in entry["other_info"][:2]])
    paths.append(str(entry.get("path", "")))
  labels = np.asarray(labels, np.int32).reshape(-1, 2)
  bd_train = result.get("bd_train")
  train_ratio = (float(np.mean(np.asarray(bd_train["poison_indicator"]) == 1))
                 if isinstance(bd_train, dict) and "poison_indicator" in bd_train else None)
  size = result.get("img_size")
  return AttackResult(path, model_name, int(result["num_classes"]),
                      tuple(int(v) for v in size) if size is not None else None,
                      result.get("clean_data"), dict(result["model"]), indices, labels[:, 0],
                      labels[:, 1], tuple(paths), len(indicator), train_ratio)


def _png_path(result: AttackResult, row: int) -> Path:
  """The PNG of the ``row``-th poisoned test image: its recorded path, else
  ``bd_test_dataset/<original label>/<index>.png`` beside ``attack_result.pt`` (a moved folder)."""
  recorded = Path(result.image_paths[row])
  if recorded.is_file():
    return recorded
  index, label = int(result.test_indices[row]), int(result.original_labels[row])
  local = result.path.parent / "bd_test_dataset" / str(label) / f"{index}.png"
  if local.is_file():
    return local
  raise FileNotFoundError(f"poisoned test image {index} is neither at {recorded} nor at {local}.")


def poisoned_test_set(result: AttackResult, image_shape: tuple[int, ...]) -> PoisonedSet:
  """The stored poisoned test images as a :class:`PoisonedSet` (uint8, ``image_shape``)."""
  mode = {1: "L", 3: "RGB"}[image_shape[-1]]
  images = []
  for row, index in enumerate(result.test_indices):
    with Image.open(_png_path(result, row)) as image:
      pixels = np.asarray(image.convert(mode), np.uint8).reshape(image.size[1], image.size[0], -1)
    if pixels.shape != tuple(image_shape):
      raise ValueError(f"poisoned test image {int(index)} is {pixels.shape}; the dataset's images "
                       f"are {tuple(image_shape)}.")
    images.append(pixels)
  count = len(images)
  return PoisonedSet(np.stack(images) if count else np.zeros((0, *image_shape), np.uint8),
                     result.poisoned_labels, np.ones(count, bool), result.original_labels)


def _label_mode(result: AttackResult, attack: str) -> tuple[str, int]:
  """all2one (one poisoned label, the target) or all2all ((y + 1) mod C), as the attack allows."""
  poisoned, original = result.poisoned_labels, result.original_labels
  targets = np.unique(poisoned)
  if len(targets) == 1:
    detected, target = "all2one", int(targets[0])
  elif np.array_equal(poisoned, (original + 1) % result.num_classes):
    detected, target = "all2all", 0
  else:
    raise ValueError(f"{result.path}: the poisoned test labels are neither one target class nor "
                     "(y + 1) mod C; d3jax measures all2one and all2all attacks.")
  supported = attacks.get(attack).label_modes
  for mode in (detected, "clean_label") if detected == "all2one" else (detected,):
    if mode in supported:
      return mode, target
  raise ValueError(f"--attack {attack} supports {', '.join(supported)}, but the attack result is "
                   f"{detected}; name an attack with that label mode.")


def _check_dataset(result: AttackResult, dataset: Any, spec: str) -> None:
  problems = []
  if dataset.num_classes != result.num_classes:
    problems.append(f"{dataset.num_classes} classes, the model {result.num_classes}")
  if result.test_size != len(dataset.x_test):
    problems.append(f"{len(dataset.x_test)} test images, the result's poison indicator "
                    f"{result.test_size}")
  elif not np.array_equal(dataset.y_test[result.test_indices], result.original_labels):
    problems.append("test labels that differ from the stored original labels (another order?)")
  if result.image_size is not None and tuple(result.image_size[:2]) != dataset.image_shape[:2]:
    problems.append(f"images {dataset.image_shape}, the result {result.image_size}")
  if problems:
    raise ValueError(f"--dataset {spec} does not match {result.path}: it has "
                     f"{'; '.join(problems)}.")


def import_attack_result(path: str | Path, dataset: str, out: str | Path, *, attack: str,
                         overwrite: bool = False) -> tuple[runs.LoadedRun, dict]:
  """Writes the BackdoorBench attack result ``path`` as a d3jax attack run directory ``out``.

  Args:
    path: ``attack_result.pt`` (its PNGs in ``bd_test_dataset/`` beside it).
    dataset: the d3jax dataset spec of its clean data (e.g. ``tfds:cifar10``), whose test split
      must be the one the result was made from (checked).
    attack: the d3jax attack name the run is labelled with in tables (the trigger itself is the
      stored one; d3jax never rebuilds it for an imported run).

  Returns:
    The loaded run and its table row (ACC, ASR, RA measured by d3jax).
  """
  start = time.perf_counter()
  result = read_attack_result(path)
  name, fixed = MODELS[result.model_name]
  options = {**interop.infer_model_options(name, result.state_dict), **fixed}
  mode, target = _label_mode(result, attack)
  run = AttackRun(dataset=dataset, model=name, model_options=options, attack=attack,
                  ratio=result.train_poison_ratio or 0.0, target=target, label_mode=mode)
  writer = runs.RunWriter(out, overwrite=overwrite, inputs=[Path(path).parent])
  data, model = pipeline.data_and_model(run)
  _check_dataset(result, data, dataset)
  variables = interop.from_torch_state_dict(name, result.state_dict, result.num_classes,
                                            **options)
  backdoored = Backdoored(run, data, model, variables,
                          poisoned_test_set(result, data.image_shape))
  with writer:
    provenance = {"source": str(Path(path).resolve()), "format": "backdoorbench",
                  "sha256": pipeline.file_sha256(str(path)), "model_name": result.model_name,
                  "dataset_name": result.dataset_name, "image_size": result.image_size}
    writer.start({**runs.attack_config(run, backdoored), "imported": provenance})
    row = pipeline.table_row(attack, "none", backdoored.baseline)
    curves.append_row(writer.stage / "metrics.csv",
                      {"epoch": 0, **backdoored.baseline._asdict()})
    metrics = {**row, "warnings": [], "wall_time_s": time.perf_counter() - start}
    written = writer.finish(variables, metrics, f"imported {attack} ({result.model_name})",
                            backdoored)
  return runs.LoadedRun(written, checkpoint.load_json(written, "config.json"), metrics,
                        backdoored), row


def export_run(run_dir: str | Path, out: str | Path) -> Path:
  """Writes the model of a d3jax attack or defense run as a PyTorch state dict (``.pt``, ``.pth``,
  ``.bin`` with PyTorch installed, or ``.safetensors``) in BackdoorBench's parameter names."""
  loaded = runs.load(run_dir)
  spec = loaded.config["model"]
  state = interop.to_torch_state_dict(spec["name"], loaded.backdoored.variables,
                                      **spec["options"])
  return interop.save_torch_state_dict(out, state)
