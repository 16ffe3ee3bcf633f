"""Ctrl-C and SIGTERM through the command line, with real signals: one line, exit 130, and either a
resumable partial run or nothing."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from d3jax import cli
from d3jax.rundirs import checkpoint, runs

pytestmark = pytest.mark.slow
DEFEND = ["--quiet", "--checkpoint-every", "0", "ft", "--epochs", "150", "--batch-size", "32",
          "--reserved.ratio", "0.1"]


def _start(args):
  return subprocess.Popen([sys.executable, "-m", "d3jax", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(path, process, timeout=180):
  deadline = time.time() + timeout
  while not path.exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_defend_keeps_a_resumable_run(cli_attack_run, tmp_path, signum):
  out = tmp_path / "ft"
  args = ["defend", "--attack-run", str(cli_attack_run), "--out", str(out), *DEFEND]
  process = _start(args)
  stage = checkpoint.staging_dir(out)
  _wait_for(stage / "checkpoints", process)  # at least one epoch saved
  time.sleep(1.0)
  process.send_signal(signum)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "run the same command with --resume" in lines[0], err
  assert "Traceback" not in err
  assert stage.is_dir() and not out.exists()
  assert cli.main([*args, "--resume"]) == 0
  assert runs.load(out).kind == "defense" and not stage.exists()


def test_interrupted_sweep_leaves_nothing(cli_attack_run, tmp_path):
  out = tmp_path / "sweep"
  process = _start(["sweep", "--attack-run", str(cli_attack_run), "--out", str(out), "--grid",
                    "learning_rate=0.01,0.02", "--quiet", "--reserved.ratio", "0.1", "ft",
                    "--epochs", "400", "--batch-size", "32"])
  stage = checkpoint.staging_dir(out)
  _wait_for(stage / "config.json", process)
  time.sleep(2.0)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "nothing was written" in lines[0], err
  assert not stage.exists() and not out.exists()
  assert not checkpoint.lock_path(out).exists()
