"""experiments/paper/run.py: the paper-scale commands parse, and the smoke setting runs end to end."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from d3jax import cli

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper" / "run.py"


@pytest.fixture(scope="module")
def paper():
  spec = importlib.util.spec_from_file_location("paper_run", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_paper_scale_commands_parse(paper, tmp_path):
  """Every command of every experiment, at paper scale and imported, is a valid d3jax command."""
  for name in paper.EXPERIMENTS:
    for import_dir in (None, tmp_path / "bb"):
      for command in paper.commands_for(name, tmp_path, import_dir=import_dir):
        cli.parse(command)  # raises SystemExit on a flag the command line does not know
  table = paper.commands_for("table1", tmp_path)
  assert len(table) == 1 and table[0][0] == "table"
  assert set(paper.TABLE1_ATTACKS) <= set(table[0]) and "--flip" in table[0]
  imported = paper.commands_for("table1", tmp_path, import_dir=tmp_path / "bb")
  assert sum(c[0] == "import" for c in imported) == 7 and sum(c[0] == "defend" for c in imported) == 84


@pytest.mark.slow
def test_smoke_setting_runs_every_experiment(paper, tmp_path):
  for name in paper.EXPERIMENTS:
    paper.run(paper.commands_for(name, tmp_path, smoke=True))
  assert (tmp_path / "table1" / "table.txt").is_file()
  assert (tmp_path / "table5" / "defenses" / "badnets-rho1.0" / "ft" / "manifest.json").is_file()
  for name in ("table6", "table7"):
    assert (tmp_path / name / "sweeps" / "badnets" / "results.csv").is_file()
  assert list((tmp_path / "figure2" / "figures" / "badnets").glob("*.png"))
  assert len(list((tmp_path / "figure3" / "figures").glob("*.png"))) >= 2
