"""Two processes writing the same run directory: the second fails at once, the first is untouched."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from d3jax.rundirs import checkpoint, runs

pytestmark = pytest.mark.slow


def _defend(cli_attack_run, out, epochs):
  return subprocess.Popen(
      [sys.executable, "-m", "d3jax", "defend", "--attack-run", str(cli_attack_run), "--out", str(out),
       "--quiet", "ft", "--epochs", str(epochs), "--batch-size", "32", "--reserved.ratio", "0.1"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_writer_of_the_same_out_fails_at_once(cli_attack_run, tmp_path):
  out = tmp_path / "ft"
  first = _defend(cli_attack_run, out, 400)
  stage = checkpoint.staging_dir(out)
  deadline = time.time() + 120
  while not (stage / "config.json").exists():  # the first is writing its run
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.2)
  started = time.time()
  second = _defend(cli_attack_run, out, 400)
  _, err = second.communicate(timeout=120)
  assert second.returncode == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "is being written by another d3jax process" in lines[0], err
  assert first.poll() is None, "the first writer should still be training"
  assert time.time() - started < 60
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err
  assert runs.load(out).kind == "defense"  # finished intact: its manifest checks
  assert not stage.exists()


def test_lock_is_per_process_and_released_on_exit(tmp_path):
  out = (tmp_path / "run").absolute()
  checkpoint.lock_run(out)
  checkpoint.lock_run(out)  # a no-op: this process holds it
  probe = subprocess.run(
      [sys.executable, "-c", "import sys; from pathlib import Path; from d3jax.rundirs import checkpoint; "
       f"checkpoint.check_unlocked(Path({str(out)!r}))"], capture_output=True, text=True)
  assert probe.returncode != 0 and "being written by another d3jax process" in probe.stderr
  checkpoint.unlock_run(out)
  probe = subprocess.run(
      [sys.executable, "-c", "from pathlib import Path; from d3jax.rundirs import checkpoint; "
       f"checkpoint.check_unlocked(Path({str(out)!r}))"], capture_output=True, text=True)
  assert probe.returncode == 0, probe.stderr
