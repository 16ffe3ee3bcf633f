"""Run directories (DESIGN.md, Artifacts): JSON files, orbax checkpoints and a sha256 manifest.

A run directory holds the run's configuration, every number a table needs, and the model
variables (a pytree such as ``{'params': ..., 'batch_stats': ...}``) saved with orbax's
StandardCheckpointer. Nothing is pickled: loading a run reads JSON and tensorstore arrays only and
never executes code from the files.

A run is built in a hidden sibling ``.<name>.partial`` (:func:`staging_dir`) and renamed into
place by :func:`finish_run` once every file is written, so a run killed mid-way leaves no
directory that loads. ``finish_run`` writes ``manifest.json`` with the sha256 of every file;
:func:`verify_run` checks it, so a damaged or hand-edited run is refused. While it trains, a run
keeps per-epoch training states in ``checkpoints/`` of the staging directory
(:class:`EpochCheckpoints`, orbax ``CheckpointManager``), which is what ``--resume`` reads.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
MANIFEST = "manifest.json"
_HOW_TO_CREATE = ("runs are created with d3jax.rundirs.checkpoint.save_run(run_dir, variables, "
                  "config=...)")


def to_json(value: Any, key: str) -> Any:
  """Returns ``value`` with numpy/jax scalars made python; TypeError names the offending key."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, dict):
    for k in value:
      if not isinstance(k, str):
        raise TypeError(f"{key}: JSON keys must be strings, got {k!r} ({type(k).__name__}).")
    return {k: to_json(v, f"{key}/{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v, f"{key}/{i}") for i, v in enumerate(value)]
  raise TypeError(
      f"{key}: {type(value).__name__} is not JSON-serializable; store numbers, strings, lists "
      "and dicts (convert arrays with .tolist(), save large arrays as a checkpoint).")


def save_json(path: str | Path, obj: dict) -> Path:
  """Writes ``obj`` as JSON (sorted keys, indent 2) after converting numpy/jax scalars.

  Raises:
    TypeError: naming the '/'-joined key of the first value JSON cannot represent.
  """
  path = Path(path)
  text = json.dumps(to_json(obj, path.name), sort_keys=True, indent=2)
  path.write_text(text + "\n")
  return path


def load_json(run_dir: str | Path, filename: str) -> Any:
  """Reads ``run_dir/filename`` (e.g. ``"config.json"``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not valid JSON (the message names the file, line and column).
  """
  path = Path(run_dir) / filename
  if not path.is_file():
    raise FileNotFoundError(f"no {filename} at {path}; {_HOW_TO_CREATE}.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{path} is not valid JSON ({err}); the file is damaged.") from None


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
  files = {"config.json": to_json(config, "config")}
  if metrics is not None:
    files["metrics.json"] = to_json(metrics, "metrics")
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    for filename, obj in files.items():
      save_json(path.parent / filename, obj)
  return save_variables(path.parent, variables, name)


# Orbax writes a checkpoint as some 20 small files (metadata, an OCDBT manifest, data), each taking
# at least one block, next to the arrays' bytes.
_CHECKPOINT_OVERHEAD_BYTES = 160 * 1024


def _require_space(directory: Path, variables: PyTree) -> None:
  """Raises ENOSPC before orbax starts when ``directory``'s file system cannot hold ``variables``
  (their bytes, uncompressed, plus the checkpoint's small files): orbax's writer threads meet a
  full disk mid-write as a ValueError and leave asyncio tracebacks on stderr."""
  needed = _CHECKPOINT_OVERHEAD_BYTES + sum(
      int(np.prod(np.shape(leaf))) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
      for leaf in jax.tree_util.tree_leaves(_key_data(variables)))
  if shutil.disk_usage(directory).free < needed:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def save_variables(run_dir: str | Path, variables: PyTree, name: str) -> Path:
  """Saves the pytree ``variables`` as the orbax checkpoint ``name`` of ``run_dir`` (every
  process takes part); returns the absolute run directory."""
  path = _checkpoint_path(run_dir, name)
  _require_space(path.parent, variables)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, variables, force=True)
  return path.parent


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
  """Writes ``arrays`` as an uncompressed npz (process 0 only); no object arrays."""
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  for key, value in arrays.items():
    if value.dtype == object:
      raise TypeError(f"{key}: object arrays cannot be stored without pickle; store numbers.")
  if jax.process_index() == 0:
    with open(path, "wb") as f:
      np.savez(f, **arrays)
  return Path(path)


def load_arrays(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
  """Reads the arrays ``names`` of an npz written by :func:`save_arrays` (never unpickles).

  Raises:
    ValueError: the file is not a readable npz or lacks one of ``names``.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [name for name in names if name not in data.files]
      if missing:
        raise ValueError(f"{path} lacks the arrays {missing}; it holds {data.files}.")
      return {name: data[name] for name in names}
  except (OSError, EOFError, zipfile.BadZipFile) as err:
    raise ValueError(f"{path} cannot be read as npz ({err}); the file is damaged.") from None


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
    ValueError: the saved tree differs from ``like`` in structure or in a leaf's shape, or the
      checkpoint files cannot be read.
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
    try:
      saved = checkpointer.metadata(path).item_metadata.tree
    except Exception as err:  # noqa: BLE001 - orbax fails in many ways on damaged files
      raise _damaged(path, err) from None
    mismatch = _first_mismatch(_flat_shapes(saved), _flat_shapes(like))
    if mismatch:
      raise ValueError(f"checkpoint at {path} does not match the model: {mismatch}.")
    try:
      return checkpointer.restore(path, like)
    except Exception as err:  # noqa: BLE001
      raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> ValueError:
  reason = str(err).splitlines()[0] if str(err) else type(err).__name__
  return ValueError(f"checkpoint at {path} cannot be read ({type(err).__name__}: {reason[:200]}); "
                    "the files are damaged or were not written by orbax.")


def load_run(run_dir: str | Path, like: PyTree,
             name: str = "variables") -> tuple[PyTree, dict, dict | None]:
  """Returns ``(variables, config, metrics)``; metrics is None when no metrics.json was saved."""
  variables = load_variables(run_dir, like, name)
  config = load_json(run_dir, "config.json")
  metrics_path = Path(run_dir) / "metrics.json"
  metrics = load_json(run_dir, "metrics.json") if metrics_path.is_file() else None
  return variables, config, metrics


# ----------------------------------------------------------------------------------------------
# Atomic run directories with a manifest.


def staging_dir(out: str | Path) -> Path:
  """The hidden sibling ``.<name>.partial`` where the run ``out`` is built before the rename."""
  out = Path(out).absolute()
  return out.parent / f".{out.name}.partial"


def _inside(path: Path, other: Path) -> bool:
  return path == other or other in path.parents


def check_out(out: str | Path, *, overwrite: bool = False, resume: bool = False,
              inputs: Sequence[str | Path] = ()) -> Path:
  """Validates an output run directory before any work starts; returns it absolute.

  Raises:
    ValueError: ``out`` is empty, or is (or contains, or lies inside) one of ``inputs``
      (``--overwrite`` never replaces the input run).
    FileExistsError: ``out`` exists and ``overwrite`` is False, or it is a file.
    FileNotFoundError: ``resume`` and there is no interrupted run of ``out`` to resume.
  """
  if not str(out).strip():
    raise ValueError("--out must name a run directory to write, got an empty string.")
  path = Path(out).expanduser().absolute().resolve()
  for run in inputs:
    source = Path(run).expanduser().absolute().resolve()
    if _inside(path, source) or _inside(source, path):
      raise ValueError(f"--out {out} would overwrite the input run {run}; choose another "
                       "directory (--overwrite never replaces an input run).")
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"--out {out} is an existing file, not a run directory; choose "
                          "another path.")
  if path.exists() and not overwrite:
    raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it or choose "
                          "another directory.")
  if resume and not (staging_dir(path) / "config.json").is_file():
    raise FileNotFoundError(f"--resume: no interrupted run of {out} to resume (looked for "
                            f"{staging_dir(path)}); run without --resume.")
  return path


_LOCKS: dict[Path, int] = {}  # run directory -> descriptor of its lock file, held by this process


def lock_path(out: str | Path) -> Path:
  """The lock file ``.<name>.lock`` beside the run directory ``out``."""
  out = Path(out).absolute()
  return out.parent / f".{out.name}.lock"


def lock_run(out: Path) -> None:
  """Takes the exclusive lock of the run directory ``out`` for this process (a no-op when it holds
  it already), so a second process writing the same run fails at once instead of writing into the
  first one's staging directory. The lock is an ``flock`` on ``.<name>.lock`` beside ``out``; the
  operating system releases it when the process dies, :func:`unlock_run` removes the file.

  Raises:
    FileExistsError: another process holds the lock.
    PermissionError: the parent of ``out`` cannot be written (read-only, no permission).
  """
  if out in _LOCKS:
    return
  path = lock_path(out)
  while True:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
      raise PermissionError(f"--out {out}: cannot write in {path.parent} ({err.strerror}); "
                            "choose a directory you can write to.") from None
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(descriptor)
      raise FileExistsError(f"--out {out} is being written by another d3jax process (it holds "
                            f"{path}); wait for it to finish or choose another directory.") from None
    try:  # the file may have been removed by its last holder between our open and our lock
      if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(descriptor)
  _LOCKS[out] = descriptor


def check_unlocked(out: Path) -> None:
  """Raises what :func:`lock_run` raises when ``out`` is locked by another process or cannot be
  written, without keeping the lock (a check before any work; the writer locks when it starts)."""
  if out not in _LOCKS:
    lock_run(out)
    unlock_run(out)


def unlock_run(out: Path) -> None:
  """Releases the lock :func:`lock_run` took (nothing when this process does not hold it)."""
  descriptor = _LOCKS.pop(out, None)
  if descriptor is not None:
    lock_path(out).unlink(missing_ok=True)  # while still locked: a waiting opener retries
    os.close(descriptor)


def begin_run(out: Path, *, resume: bool = False) -> Path:
  """Creates (or, when resuming, reuses) the staging directory of ``out`` and returns it."""
  stage = staging_dir(out)
  if not resume and stage.exists():
    shutil.rmtree(stage)
  stage.mkdir(parents=True, exist_ok=True)
  return stage


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(run_dir: Path) -> list[str]:
  return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
                if p.is_file() and p.name != MANIFEST)


def finish_run(stage: Path, out: Path) -> Path:
  """Writes the manifest of ``stage`` and renames it to ``out`` (replacing an old ``out``).

  Per-epoch training checkpoints are dropped first: a finished run does not resume.
  """
  shutil.rmtree(stage / "checkpoints", ignore_errors=True)
  save_json(stage / MANIFEST, {"sha256": {name: _sha256(stage / name) for name in _files(stage)}})
  old = out.parent / f".{out.name}.old"
  if out.exists():
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
  os.replace(stage, out)
  shutil.rmtree(old, ignore_errors=True)
  return out


def verify_run(run_dir: str | Path) -> Path:
  """Checks every file of a finished run against its manifest; returns the absolute path.

  Raises:
    FileNotFoundError: no such directory.
    ValueError: no manifest (an unfinished or foreign directory), or a file that is missing,
      added to the checkpoint, or whose sha256 differs from the manifest's.
  """
  path = Path(run_dir).expanduser().absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no run directory at {run_dir}; runs are written by `d3jax attack` "
                            "and `d3jax defend`.")
  if not (path / MANIFEST).is_file():
    raise ValueError(f"{run_dir} is not a finished d3jax run (no {MANIFEST}); it was interrupted "
                     "or not written by d3jax.")
  manifest = load_json(path, MANIFEST)
  expected = manifest.get("sha256") if isinstance(manifest, dict) else None
  if not isinstance(expected, dict):
    raise ValueError(f"{path / MANIFEST} has no 'sha256' table; the manifest is damaged.")
  for name, digest in expected.items():
    file = path / name
    if not file.is_file():
      raise ValueError(f"run {run_dir} is incomplete: {name} is listed in its manifest but "
                       "missing.")
    if _sha256(file) != digest:
      raise ValueError(f"run {run_dir} was modified or damaged: {name} does not match the sha256 "
                       "in its manifest.")
  extra = [name for name in _files(path) if name not in expected and name.startswith("variables/")]
  if extra:
    raise ValueError(f"run {run_dir} was modified: {extra[0]} is not in its manifest.")
  return path


# ----------------------------------------------------------------------------------------------
# Per-epoch training states for resume.


def _is_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_data(tree: PyTree) -> PyTree:
  """Typed PRNG keys as their raw uint32 data (orbax stores plain arrays only)."""
  return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


class EpochCheckpoints:
  """Training states saved after every epoch with orbax's ``CheckpointManager``.

  Keeps the last ``keep`` epochs under ``directory``; typed PRNG keys in the state are stored
  as their key data and rewrapped (with the implementation of ``like``'s keys) on restore.
  """

  def __init__(self, directory: str | Path, keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self._directory, options=options)

  def __enter__(self) -> "EpochCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._manager.close()

  def latest(self) -> int | None:
    """The last saved epoch (1-based), or None."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: PyTree) -> None:
    _require_space(self._directory, state)
    self._manager.save(epoch, args=ocp.args.StandardSave(_key_data(state)))
    self._manager.wait_until_finished()

  def restore(self, like: PyTree, epoch: int | None = None) -> PyTree:
    """The state of ``epoch`` (default: the latest), with the structure and dtypes of ``like``."""
    epoch = self.latest() if epoch is None else epoch
    if epoch is None:
      raise FileNotFoundError(f"no epoch checkpoint in {self._manager.directory} to resume from.")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                            _key_data(like))
    try:
      raw = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # noqa: BLE001 - orbax fails in many ways on damaged files
      raise _damaged(Path(self._manager.directory) / str(epoch), err) from None
    return jax.tree.map(
        lambda ref, leaf: jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(ref))
        if _is_key(ref) else leaf, like, raw)
