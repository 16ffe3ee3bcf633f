"""Run directories (DESIGN.md, Artifacts): ``config.json``, ``metrics.json`` and orbax checkpoints.

A run directory holds the run's configuration, every number a table needs, and the model
variables (a pytree such as ``{'params': ..., 'batch_stats': ...}``) saved with orbax's
StandardCheckpointer. Nothing is pickled: loading a run reads JSON and tensorstore arrays only and
never executes code from the files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
_HOW_TO_CREATE = ("runs are created with d3jax.checkpoint.save_run(run_dir, variables, "
                  "config=...)")


def _to_json(value: Any, key: str) -> Any:
  """Returns ``value`` with numpy/jax scalars made python; TypeError names the offending key."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, dict):
    for k in value:
      if not isinstance(k, str):
        raise TypeError(f"{key}: JSON keys must be strings, got {k!r} ({type(k).__name__}).")
    return {k: _to_json(v, f"{key}/{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v, f"{key}/{i}") for i, v in enumerate(value)]
  raise TypeError(
      f"{key}: {type(value).__name__} is not JSON-serializable; store numbers, strings, lists "
      "and dicts (convert arrays with .tolist(), save large arrays as a checkpoint).")


def save_json(path: str | Path, obj: dict) -> Path:
  """Writes ``obj`` as JSON (sorted keys, indent 2) after converting numpy/jax scalars.

  Raises:
    TypeError: naming the '/'-joined key of the first value JSON cannot represent.
  """
  path = Path(path)
  text = json.dumps(_to_json(obj, path.name), sort_keys=True, indent=2)
  path.write_text(text + "\n")
  return path


def load_json(run_dir: str | Path, filename: str) -> Any:
  """Reads ``run_dir/filename`` (e.g. ``"config.json"``)."""
  path = Path(run_dir) / filename
  if not path.is_file():
    raise FileNotFoundError(f"no {filename} at {path}; {_HOW_TO_CREATE}.")
  return json.loads(path.read_text())


def _checkpoint_path(run_dir: str | Path, name: str) -> Path:
  if not name or Path(name).name != name or name in (".", ".."):
    raise ValueError(f"checkpoint name must be a plain file name, got {name!r}.")
  return Path(run_dir).absolute() / name


def save_run(run_dir: str | Path, variables: PyTree, *, config: dict,
             metrics: dict | None = None, name: str = "variables") -> Path:
  """Saves a run: ``config.json``, ``metrics.json`` (when given) and an orbax checkpoint.

  JSON is validated before anything is written and written by process 0 only; every process
  takes part in the orbax save. A checkpoint of the same ``name`` is overwritten; an existing
  ``metrics.json`` is kept when ``metrics`` is None.

  Returns:
    The absolute run directory.
  """
  path = _checkpoint_path(run_dir, name)
  files = {"config.json": _to_json(config, "config")}
  if metrics is not None:
    files["metrics.json"] = _to_json(metrics, "metrics")
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    for filename, obj in files.items():
      save_json(path.parent / filename, obj)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, variables, force=True)
  return path.parent


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """Maps '/'-joined leaf paths to shapes (arrays, ShapeDtypeStructs or orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
              tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
          for path, leaf in leaves}


def _first_mismatch(saved: dict, expected: dict) -> str | None:
  """Describes the differences between saved and expected leaf shapes, or None if they agree."""
  problems = []
  for key, shape in expected.items():
    if key not in saved:
      problems.append(f"{key}: missing from the checkpoint (expected shape {shape})")
    elif saved[key] != shape:
      problems.append(f"{key}: saved shape {saved[key]} vs expected {shape}")
  problems += [f"{key}: saved shape {shape} but the model has no such variable"
               for key, shape in saved.items() if key not in expected]
  if not problems:
    return None
  more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
  return problems[0] + more


def load_variables(run_dir: str | Path, like: PyTree, name: str = "variables") -> PyTree:
  """Restores the checkpoint ``name`` of ``run_dir`` into the structure of ``like``.

  Args:
    run_dir: a directory written by :func:`save_run`.
    like: a pytree with the target structure: real arrays or ``jax.ShapeDtypeStruct`` leaves,
      e.g. ``jax.eval_shape(model.init, key, x)``. Leaves are restored with ``like``'s dtypes
      (orbax casts when the saved dtype differs) and, for jax arrays, its shardings.

  Raises:
    FileNotFoundError: no run directory or no checkpoint of that name.
    ValueError: the saved tree differs from ``like`` in structure or in a leaf's shape.
  """
  run_dir = Path(run_dir)
  if not run_dir.is_dir():
    raise FileNotFoundError(f"no run directory at {run_dir}; {_HOW_TO_CREATE}.")
  path = _checkpoint_path(run_dir, name)
  if not path.is_dir():
    found = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    raise FileNotFoundError(
        f"no checkpoint {name!r} at {path} (checkpoints there: {found or 'none'}); "
        f"{_HOW_TO_CREATE}.")
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata.tree
    mismatch = _first_mismatch(_flat_shapes(saved), _flat_shapes(like))
    if mismatch:
      raise ValueError(f"checkpoint at {path} does not match the model: {mismatch}.")
    return checkpointer.restore(path, like)


def load_run(run_dir: str | Path, like: PyTree,
             name: str = "variables") -> tuple[PyTree, dict, dict | None]:
  """Returns ``(variables, config, metrics)``; metrics is None when no metrics.json was saved."""
  variables = load_variables(run_dir, like, name)
  config = load_json(run_dir, "config.json")
  metrics_path = Path(run_dir) / "metrics.json"
  metrics = load_json(run_dir, "metrics.json") if metrics_path.is_file() else None
  return variables, config, metrics
