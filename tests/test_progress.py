"""Progress reports: a bar on a terminal, plain lines (no carriage returns) anywhere else."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from d3jax.progress import LineProgress, progress_bar


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_lines_not_carriage_returns_when_not_a_terminal(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr("d3jax.progress.time.perf_counter", clock)
  stream = io.StringIO()
  bar = progress_bar(range(100), desc="train", stream=stream, interval_s=10.0)
  assert isinstance(bar, LineProgress)
  for index in bar:
    clock.now += 1.0  # one second per item: a line every ten items, and one after the last
    bar.set_postfix(loss=f"{1 / (index + 1):.3f}")
  text = stream.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 10, lines
  assert lines[0] == "train: 10/100 loss=0.100 (10 s)"
  assert lines[-1] == "train: 100/100 loss=0.010 (100 s)"


def test_disabled_is_silent_and_a_resumed_count_starts_at_initial():
  stream = io.StringIO()
  assert list(progress_bar(range(3), desc="x", disable=True, stream=stream)) == [0, 1, 2]
  assert stream.getvalue() == ""
  bar = progress_bar(range(5, 8), desc="train", initial=5, total=8, stream=stream, interval_s=0)
  list(bar)
  bar.close()  # after the loop already closed it: no second final line
  assert stream.getvalue().splitlines()[-1].startswith("train: 8/8")
  assert len(stream.getvalue().splitlines()) == 3


@pytest.mark.slow
def test_redirected_demo_style_run_has_no_carriage_returns(tmp_path):
  """A training run through the command line with stderr to a file (not a terminal)."""
  log = tmp_path / "log.txt"
  with open(log, "w") as stderr:
    subprocess.run([sys.executable, "-m", "d3jax", "attack", "--out", str(tmp_path / "run"),
                    "--dataset", "digits", "--model-options", "width", "4", "--epochs", "2",
                    "--batch-size", "64", "--eval-every", "0"], stderr=stderr, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
  text = log.read_text()
  assert "\r" not in text
  assert "epoch 2/2" in text
