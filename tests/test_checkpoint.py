"""Tests of d3jax.rundirs.checkpoint: run directories with JSON and orbax checkpoints, no pickle."""
import errno
import json
import pickle
import pickletools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3jax.rundirs import checkpoint


class TinyNet(nn.Module):
  width: int = 8
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(self.width)(x)))
    return nn.Dense(self.num_classes)(x)


def _init(model, seed=0):
  return model.init(jax.random.key(seed), jnp.ones((2, 4)))


def _trained_like(variables):
  """Variables whose batch stats differ from init, so a restore cannot pass by accident."""
  return jax.tree.map(lambda v: v + 0.25, variables)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _is_pickle(data: bytes) -> bool:
  """True when ``data`` parses as one complete pickle (parsed with pickletools; never loaded)."""
  try:
    ops = list(pickletools.genops(data))
  except Exception:  # pylint: disable=broad-except  # anything unparsable is not a pickle
    return False
  return bool(ops) and ops[-1][0].name == "STOP"


def test_round_trip_is_bit_exact(tmp_path):
  variables = _trained_like(_init(TinyNet()))
  run_dir = checkpoint.save_run(tmp_path / "run", variables, config={"width": 8},
                                metrics={"acc": 0.5})
  assert run_dir == (tmp_path / "run").absolute()
  restored = checkpoint.load_variables(run_dir, _init(TinyNet(), seed=1))
  _assert_trees_equal(restored, variables)
  assert set(restored) == {"params", "batch_stats"}


def test_restore_into_shape_dtype_structs(tmp_path):
  model = TinyNet()
  variables = _trained_like(_init(model))
  checkpoint.save_run(tmp_path, variables, config={})
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 4)))
  assert isinstance(jax.tree.leaves(like)[0], jax.ShapeDtypeStruct)
  restored, config, metrics = checkpoint.load_run(tmp_path, like)
  _assert_trees_equal(restored, variables)
  assert config == {} and metrics is None
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  np.testing.assert_array_equal(model.apply(restored, x), model.apply(variables, x))


def test_json_contents(tmp_path):
  config = {"lr": np.float32(0.5), "steps": jnp.int32(7), "name": "d3",
            "nested": {"b": 1, "a": [True, None]}, "shape": (2, 3)}
  checkpoint.save_run(tmp_path, _init(TinyNet()), config=config, metrics={"acc": jnp.float32(0.25)})
  text = (tmp_path / "config.json").read_text()
  assert json.loads(text) == {"lr": 0.5, "steps": 7, "name": "d3",
                              "nested": {"a": [True, None], "b": 1}, "shape": [2, 3]}
  assert text.index('"lr"') < text.index('"name"') < text.index('"nested"')
  assert '\n  "lr": 0.5,' in text  # indent 2
  assert checkpoint.load_json(tmp_path, "metrics.json") == {"acc": 0.25}
  checkpoint.save_json(tmp_path / "extra.json", {"z": np.int64(3), "y": np.bool_(True)})
  assert checkpoint.load_json(tmp_path, "extra.json") == {"y": True, "z": 3}


def test_non_json_value_raises_before_writing(tmp_path):
  with pytest.raises(TypeError, match="config/optim/schedule"):
    checkpoint.save_run(tmp_path / "run", _init(TinyNet()),
                        config={"optim": {"schedule": lambda step: step}})
  with pytest.raises(TypeError, match=r"metrics/per_class.*tolist"):
    checkpoint.save_run(tmp_path / "run", _init(TinyNet()), config={},
                        metrics={"per_class": np.ones(3)})
  assert not (tmp_path / "run").exists()


def test_overwrite_same_name(tmp_path):
  checkpoint.save_run(tmp_path, _init(TinyNet()), config={}, metrics={"acc": 0.1})
  newer = _trained_like(_init(TinyNet(), seed=2))
  checkpoint.save_run(tmp_path, newer, config={"round": 2})
  restored, config, metrics = checkpoint.load_run(tmp_path, _init(TinyNet()))
  _assert_trees_equal(restored, newer)
  assert config == {"round": 2} and metrics == {"acc": 0.1}


@pytest.mark.parametrize("other,expected", [
    (TinyNet(width=16),  # leaves are compared in sorted path order; 7 leaves differ.
     "batch_stats/BatchNorm_0/mean: saved shape (8,) vs expected (16,) (and 6 more differences)."),
    (TinyNet(num_classes=10),
     "params/Dense_1/bias: saved shape (3,) vs expected (10,) (and 1 more differences)."),
])
def test_mismatched_model_raises_clear_error(tmp_path, other, expected):
  checkpoint.save_run(tmp_path, _init(TinyNet()), config={})
  with pytest.raises(ValueError) as info:
    checkpoint.load_variables(tmp_path, jax.eval_shape(lambda: _init(other)))
  message = str(info.value)
  assert message.startswith(f"checkpoint at {tmp_path / 'variables'} does not match the model: ")
  assert expected in message


def test_different_structure_raises(tmp_path):
  variables = _init(TinyNet())
  checkpoint.save_run(tmp_path, {"params": variables["params"]}, config={})
  with pytest.raises(ValueError, match="batch_stats/BatchNorm_0/mean: missing from the checkpoint"):
    checkpoint.load_variables(tmp_path, variables)


def test_missing_paths_raise_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no run directory at .*nope.*save_run"):
    checkpoint.load_variables(tmp_path / "nope", _init(TinyNet()))
  checkpoint.save_run(tmp_path, _init(TinyNet()), config={})
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 'best'.*\['variables'\].*save_run"):
    checkpoint.load_run(tmp_path, _init(TinyNet()), name="best")
  with pytest.raises(FileNotFoundError, match="metrics.json"):
    checkpoint.load_json(tmp_path, "metrics.json")


def test_run_dir_holds_no_pickle(tmp_path):
  assert _is_pickle(pickle.dumps({"a": np.ones(2)}))  # the detector works
  checkpoint.save_run(tmp_path, _trained_like(_init(TinyNet())), config={"a": 1},
                      metrics={"acc": 0.9})
  files = [p for p in tmp_path.rglob("*") if p.is_file()]
  assert {"config.json", "metrics.json"} <= {p.name for p in files}
  assert len(files) > 3
  for path in files:
    assert path.suffix not in (".pkl", ".pickle"), path
    assert not _is_pickle(path.read_bytes()), path


def test_relative_run_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  variables = _init(TinyNet())
  assert checkpoint.save_run("runs/a", variables, config={}) == tmp_path / "runs" / "a"
  _assert_trees_equal(checkpoint.load_variables("runs/a", variables), variables)


def test_damaged_json_and_checkpoint_name_the_file(tmp_path):
  checkpoint.save_run(tmp_path, _init(TinyNet()), config={"a": 1})
  (tmp_path / "config.json").write_text('{"a": ')
  with pytest.raises(ValueError, match=r"config.json is not valid JSON \(.*\); the file is damaged."):
    checkpoint.load_json(tmp_path, "config.json")
  for path in (tmp_path / "variables").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"checkpoint at .*variables cannot be read .* damaged"):
    checkpoint.load_variables(tmp_path, _init(TinyNet()))


def test_finish_run_renames_into_place_with_a_manifest(tmp_path):
  out = checkpoint.check_out(tmp_path / "run")
  stage = checkpoint.begin_run(out)
  assert stage == tmp_path / ".run.partial" and not out.exists()
  checkpoint.save_run(stage, _init(TinyNet()), config={"a": 1}, metrics={"acc": 0.5})
  (stage / "checkpoints").mkdir()
  checkpoint.finish_run(stage, out)
  assert not stage.exists() and not (out / "checkpoints").exists()
  manifest = json.loads((out / "manifest.json").read_text())["sha256"]
  assert {"config.json", "metrics.json"} <= set(manifest)
  assert any(name.startswith("variables/") for name in manifest)
  assert checkpoint.verify_run(out) == out
  with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
    checkpoint.check_out(out)
  assert checkpoint.check_out(out, overwrite=True) == out
  (out / "variables" / "extra").write_text("x")
  with pytest.raises(ValueError, match="was modified: variables/extra is not in its manifest."):
    checkpoint.verify_run(out)


def test_epoch_checkpoints_round_trip_typed_keys_and_keep_the_last(tmp_path):
  state = {"params": _init(TinyNet())["params"], "step": jnp.int32(0),
           "key": jax.random.key(3, impl="rbg")}
  with checkpoint.EpochCheckpoints(tmp_path / "ckpt", keep=2) as epochs:
    assert epochs.latest() is None
    with pytest.raises(FileNotFoundError, match="no epoch checkpoint"):
      epochs.restore(state)
    for epoch in (1, 2, 3):
      epochs.save(epoch, {**state, "step": jnp.int32(epoch),
                          "key": jax.random.fold_in(state["key"], epoch)})
    assert epochs.latest() == 3
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
  with checkpoint.EpochCheckpoints(tmp_path / "ckpt") as epochs:
    restored = epochs.restore(state)
  assert int(restored["step"]) == 3
  assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(jax.random.fold_in(state["key"], 3)))
  _assert_trees_equal(restored["params"], state["params"])


@pytest.mark.parametrize("every_s, saved", [(0.0, [1, 2]), (1e9, [])])
def test_runs_checkpoint_by_elapsed_time(tmp_path, every_s, saved):
  """A run saves its state after an epoch only when checkpoint_every_s has passed (0: always);
  the last epoch is always saved (not reached here: 2 of 3 epochs)."""
  from d3jax.rundirs import runs  # pylint: disable=import-outside-toplevel
  state = _StateLike(_init(TinyNet())["params"], jnp.int32(0))
  recorder = runs.Recorder(tmp_path, None, 3, runs.Tracking(eval_every=0, progress=False,
                                                           checkpoint_every_s=every_s))
  for epoch in (0, 1):
    recorder(epoch, state, {"loss": np.zeros(2)})
  recorder.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == saved


@flax.struct.dataclass
class _StateLike:
  """A pytree with the ``variables`` property the recorder reads."""
  params: dict
  step: jax.Array

  @property
  def variables(self):
    return {"params": self.params}


def test_tracking_rejects_a_negative_checkpoint_interval():
  from d3jax.rundirs import runs  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="checkpoint_every_s must be"):
    runs.Tracking(checkpoint_every_s=-1)


def test_run_log_keeps_info_lines_without_the_command_line(tmp_path):
  """A run written through the Python API (no ``d3jax`` command to set the logger's level) still
  gets its INFO lines in log.txt, and the logger's own level is restored afterwards."""
  import logging  # pylint: disable=import-outside-toplevel
  from d3jax.rundirs import runs  # pylint: disable=import-outside-toplevel
  previous = runs.LOG.level
  runs.LOG.setLevel(logging.NOTSET)
  try:
    assert runs.LOG.getEffectiveLevel() > logging.INFO  # Python's default: WARNING
    with runs.RunWriter(tmp_path / "run") as writer:
      runs.LOG.info("epoch 1/1 loss 0.5")
      assert "epoch 1/1 loss 0.5" in (writer.stage / "log.txt").read_text()
    assert runs.LOG.level == logging.NOTSET
  finally:
    runs.LOG.setLevel(previous)


@pytest.mark.parametrize("spare", [0, checkpoint._CHECKPOINT_OVERHEAD_BYTES - 1])
def test_too_little_space_raises_enospc_before_orbax_writes(tmp_path, monkeypatch, spare):
  """The arrays' bytes plus the checkpoint's small files must fit, else ENOSPC and nothing written."""
  variables = _init(TinyNet())
  nbytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables))
  usage = checkpoint.shutil.disk_usage(tmp_path)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda _: usage._replace(free=nbytes + spare))
  with pytest.raises(OSError) as err:
    checkpoint.save_variables(tmp_path, variables, "variables")
  assert err.value.errno == errno.ENOSPC and not (tmp_path / "variables").exists()
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda _: usage._replace(free=nbytes + checkpoint._CHECKPOINT_OVERHEAD_BYTES))
  checkpoint.save_variables(tmp_path, variables, "variables")
  _assert_trees_equal(checkpoint.load_variables(tmp_path, variables), variables)
