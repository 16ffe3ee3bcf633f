"""Compile once: a program's jitted functions are built once per (program, shapes) and reused
across calls, runs and grid points; the persistent cache serves later processes."""
import contextlib
import subprocess
import sys

import jax
import pytest

from d3jax import defenses
from d3jax.engine import compile_cache, train
from d3jax.workflows.sweep import sweep

NORM = train.Normalization((0.5,), (0.5,))
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def backend_compiles():
  """Collects one entry per XLA backend compilation while the block runs."""
  seen = []

  def listener(name, duration, **kwargs):
    del duration, kwargs
    if name == BACKEND_COMPILE:
      seen.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def tiny_d3(**overrides):
  return defenses.get("d3", **{"epochs": 2, "batch_size": 16, "crop_padding": 1, **overrides})


def test_second_defend_compiles_nothing(model, variables, tiny_set, rbg_key):
  """A second `defend` with the same config — or one differing only in hyperparameters (λ, ε,
  learning rate, momentum) — and the same data shapes triggers no XLA compilation."""
  x, y = tiny_set
  defenses.defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=tiny_d3(),
                  progress=False)
  with backend_compiles() as seen:
    defenses.defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key,
                    config=tiny_d3(), progress=False)
    defenses.defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key,
                    config=tiny_d3(lmd=0.5, eps=0.3, learning_rate=0.05, momentum=0.5),
                    progress=False)
  assert seen == []
  with backend_compiles() as seen:  # a static setting (the warm-up) is another program
    defenses.defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key,
                    config=tiny_d3(warm_up="near"), progress=False)
  assert seen


def test_program_equality_ignores_hyperparameter_values(model):
  """Programs differing only in hyperparameter values are equal (one compilation); a static
  field makes them differ."""
  a = defenses.program("d3", model, NORM, tiny_d3(lmd=1.0))
  b = defenses.program("d3", model, NORM, tiny_d3(lmd=20.0, learning_rate=0.1))
  c = defenses.program("d3", model, NORM, tiny_d3(select="linear/.*"))
  assert a == b and hash(a) == hash(b)
  assert a != c


def test_grid_compiles_its_epoch_once(model, variables, tiny_set, rbg_key):
  """A 4-point sweep compiles the vmapped epoch once; a second sweep of other values of the same
  size compiles nothing."""
  x, y = tiny_set[0][:37], tiny_set[1][:37]  # a data shape no other test uses: a fresh program
  config = tiny_d3(batch_size=13)
  before = train._epoch._cache_size()
  sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=config,
        grid={"lmd": [0.5, 10.0], "eps": [0.0, 0.2]}, progress=False)
  assert train._epoch._cache_size() == before + 1
  with backend_compiles() as seen:
    sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=config,
          grid={"lmd": [1.0, 2.0], "learning_rate": [0.1, 0.2]}, progress=False)
  assert seen == []


def test_compile_cache_enable_sets_the_directory(tmp_path, monkeypatch):
  """enable() points JAX's persistent cache at the given (or environment's) directory."""
  previous = jax.config.jax_compilation_cache_dir
  try:
    assert compile_cache.enable(tmp_path / "a") == tmp_path / "a"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "b"))
    assert compile_cache.default_dir() == tmp_path / "b"
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)


@pytest.mark.slow
def test_persistent_cache_serves_a_second_process(tmp_path):
  """A second process with the cache enabled loads the defense's programs instead of compiling."""
  script = f"""
import jax, numpy as np
from d3jax import defenses
from d3jax.engine import compile_cache, train
from d3jax.models import get_model
compile_cache.enable({str(tmp_path)!r}, min_compile_time_s=0.0)
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
model = get_model('small_cnn', 10, width=4)
key = jax.random.key(0)
v = train.init_variables(model, (8, 8, 1), key)
x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
y = (np.arange(40) % 10).astype(np.int32)
defenses.defend('d3', model, v, x, y, normalization=train.Normalization((0.5,), (0.5,)), key=key,
                config=defenses.get('d3', epochs=1, batch_size=16), progress=False)
print('HITS', len(hits))
"""
  runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
          for _ in range(2)]
  first, second = (int(run.stdout.split("HITS")[1]) for run in runs)
  assert first == 0 and second > 0


def test_first_sweep_after_a_defend_compiles_only_its_two_programs(model, variables, tiny_set,
                                                                   rbg_key):
  """After a warm `defend`, a first sweep of the same config compiles its grid's init and its
  grid's epoch and nothing else: the grid's hyperparameters are built on the host, so no eager
  device operation compiles a small program of its own (11 of them did before)."""
  x, y = tiny_set[0][:41], tiny_set[1][:41]  # a data shape no other test uses
  config = tiny_d3(batch_size=11)
  defenses.defend("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=config,
                  progress=False)
  with backend_compiles() as seen:
    sweep("d3", model, variables, x, y, normalization=NORM, key=rbg_key, config=config,
          grid={"lmd": [0.5, 1.0, 5.0], "eps": [0.1, 0.2]}, progress=False)
  assert len(seen) == 2
