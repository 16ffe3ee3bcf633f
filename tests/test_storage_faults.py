"""A full disk and a read-only place: one line, the input run untouched, the partial run resumable.

The real cases mount a tiny (or read-only) tmpfs, which needs root and a kernel that allows it; where
that fails they skip, and the injected cases below cover the same paths.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from d3jax import cli
from d3jax.rundirs import checkpoint, runs

pytestmark = pytest.mark.slow
DEFEND = ["--quiet", "ft", "--epochs", "2", "--batch-size", "32", "--reserved.ratio", "0.1"]


@pytest.fixture
def tmpfs(tmp_path):
  """A mount point and a function that mounts or remounts a tmpfs there with options."""
  point = tmp_path / "mnt"
  point.mkdir()
  mounted = []

  def mount(options):
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)] if not mounted else \
        ["mount", "-o", f"remount,{options}", str(point)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
      pytest.skip("cannot mount a tmpfs here (needs root); the injected tests cover this path")
    mounted.append(True)
    return point

  yield mount
  if mounted:
    subprocess.run(["umount", str(point)], capture_output=True)


def _d3jax(*args):
  return subprocess.run([sys.executable, "-m", "d3jax", *args], capture_output=True, text=True,
                        timeout=600)


def _one_error_line(result, text):
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("d3jax: error: ") and text in lines[0], \
      result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("size", ["96k", "160k"])  # 160k: full midway through orbax's writes
def test_full_disk_then_resume(cli_attack_run, tmpfs, size):
  point = tmpfs(f"size={size}")
  before = checkpoint.load_json(cli_attack_run, checkpoint.MANIFEST)
  out = point / "ft"
  args = ["defend", "--attack-run", str(cli_attack_run), "--out", str(out), *DEFEND]
  result = _d3jax(*args)
  _one_error_line(result, "No space left on device")
  assert "--resume" in result.stderr and not out.exists()
  checkpoint.verify_run(cli_attack_run)  # the input run is untouched
  assert checkpoint.load_json(cli_attack_run, checkpoint.MANIFEST) == before
  tmpfs("size=20m")
  assert _d3jax(*args, "--resume").returncode == 0
  assert runs.load(out).kind == "defense"


def test_read_only_parent_refused_before_training(cli_attack_run, tmpfs):
  point = tmpfs("ro,size=1m")
  result = _d3jax("defend", "--attack-run", str(cli_attack_run), "--out", str(point / "ft"), *DEFEND)
  _one_error_line(result, "cannot write in")


def test_injected_full_disk_keeps_a_resumable_partial(cli_attack_run, tmp_path, monkeypatch, capsys):
  out = tmp_path / "ft"
  args = ["defend", "--attack-run", str(cli_attack_run), "--out", str(out), *DEFEND]

  def full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

  with monkeypatch.context() as patch:
    patch.setattr(checkpoint, "save_variables", full)
    assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0]
  assert checkpoint.staging_dir(out).is_dir() and not out.exists()
  assert cli.main([*args, "--resume"]) == 0
  assert runs.load(out).kind == "defense"


def test_tensorstore_full_disk_error_is_one_line_too(cli_attack_run, tmp_path, monkeypatch,
                                                      capsys):
  """Orbax's tensorstore reports a full disk as a ValueError (RESOURCE_EXHAUSTED ... No space left on
  device): the same one line and --resume hint."""
  out = tmp_path / "ft"

  def full(*_, **__):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"manifest.ocdbt\": Failed to "
                     "write 114 bytes to file 9: No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpoint, "save_variables", full)
  assert cli.main(["defend", "--attack-run", str(cli_attack_run), "--out", str(out), *DEFEND]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("d3jax: error: No space left on device while writing")
  assert "--resume" in err[0]


def test_injected_read_only_parent(cli_attack_run, tmp_path, monkeypatch, capsys):
  def read_only(*_, **__):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(checkpoint.os, "open", read_only)
  assert cli.main(["defend", "--attack-run", str(cli_attack_run), "--out", str(tmp_path / "x"),
                   *DEFEND]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot write in" in err[0] and "Read-only file system" in err[0]
