"""Tests of d3jax.studies.table: the cell summaries over seeds, the Table-1 text layout and its marks,
the spec's checks, and a tiny table that is reused (never retrained) when run again."""
import json

import numpy as np
import pytest

from d3jax import cli, defenses
from d3jax.rundirs import runs
from d3jax.studies import table
from d3jax.attacks.training import AttackTrainConfig
from d3jax.studies.table import TableSpec


def _row(seed, attack, defense, acc, asr, der):
  return {"seed": seed, "attack": attack, "defense": defense, "acc": acc, "asr": asr, "ra": 0.0,
          "der": der}


ROWS = [_row(0, "badnets", "none", 0.9, 1.0, None), _row(1, "badnets", "none", 0.8, 0.9, None),
        _row(0, "blended", "none", 0.9, 1.0, None), _row(1, "blended", "none", 0.9, 1.0, None),
        _row(0, "badnets", "ft", 0.9, 0.5, 0.75), _row(1, "badnets", "ft", 0.7, 0.3, 0.7),
        _row(0, "blended", "ft", 0.8, 0.9, 0.5), _row(1, "blended", "ft", 0.8, 0.7, 0.6),
        _row(0, "badnets", "d3", 0.85, 0.0, 0.9), _row(1, "badnets", "d3", 0.8, 0.1, 0.9),
        _row(0, "blended", "d3", 0.85, 0.1, 0.9), _row(1, "blended", "d3", 0.85, 0.2, 0.85)]


def test_summaries_are_mean_and_std_over_seeds_and_the_average_row():
  cells = table.summarize(ROWS, ("badnets", "blended"), ("none", "ft", "d3"))
  cell = next(c for c in cells if c["attack"] == "badnets" and c["defense"] == "ft")
  assert cell["acc"] == pytest.approx(0.8) and cell["acc_std"] == pytest.approx(0.1)
  assert cell["der"] == pytest.approx(0.725) and cell["der_std"] == pytest.approx(0.025)
  average = next(c for c in cells if c["attack"] == "average" and c["defense"] == "ft")
  # per seed: mean over attacks (0.85, 0.75) → mean 0.8, std 0.05
  assert average["acc"] == pytest.approx(0.8) and average["acc_std"] == pytest.approx(0.05)
  none = next(c for c in cells if c["attack"] == "average" and c["defense"] == "none")
  assert none["der"] is None and none["asr"] == pytest.approx(0.975)


def test_layout_marks_best_and_second_per_metric():
  """ACC and DER: higher is better; ASR: lower; '*' best, '+' second; ± with seeds."""
  cells = table.summarize(ROWS, ("badnets", "blended"), ("none", "ft", "d3"))
  text = table.format_table(cells, ("badnets", "blended"), ("ft", "d3"), seeds=2)
  lines = text.splitlines()
  assert "No defense" in lines[0] and "ft" in lines[0] and "d3" in lines[0]
  badnets = next(line for line in lines if line.startswith("badnets")).split("|")
  ft, d3 = badnets[1].split(), badnets[2].split()
  assert ft == ["80.0±10.0+", "40.0±10.0+", "72.5±2.5+"]
  assert d3 == ["82.5±2.5*", "5.0±5.0*", "90.0±0.0*"]
  assert table._ranks([0.5, 0.7, 0.7, None], True) == ["+", "*", "*", ""]
  one_seed = table.format_table(cells, ("badnets", "blended"), ("ft", "d3"), seeds=1)
  assert "±" not in one_seed and next(l for l in one_seed.splitlines() if l.startswith("average"))


@pytest.mark.parametrize("settings, match", [
    ({"defenses": ("ft", "nope")}, "unknown defense 'nope'"),
    ({"defenses": ()}, "defenses"),
    ({"attacks": ("badnets", "badnets")}, "attacks"),
    ({"seeds": 0}, "seeds"),
    ({"defense_epochs": -1}, "defense_epochs"),
    ({"ratios": {"sig": 0.05}}, "ratios"),
    ({"reserved_ratio": 0.0}, "reserved ratio"),
])
def test_spec_rejects_bad_settings(settings, match):
  with pytest.raises(ValueError, match=match):
    TableSpec(**settings)


def test_defense_epochs_caps_but_never_raises_a_defense_s_epochs():
  spec = TableSpec(defenses=("ft", "i-bau"), defense_epochs=20)
  assert spec.defense_config("ft").epochs == 20
  assert spec.defense_config("i-bau").epochs == defenses.get("i-bau").epochs == 5
  assert TableSpec(defenses=("ft",)).defense_config("ft").epochs == defenses.get("ft").epochs


def test_table_command_parses():
  command = cli.parse(["table", "--out", "x", "--dataset", "digits", "--attacks", "badnets",
                       "--defenses", "ft", "fp", "--seeds", "3", "--epochs", "2",
                       "--model-options", "width", "8", "--ratios", "badnets", "0.2"])
  assert isinstance(command, cli.TableCommand)
  run = command.spec.attack_run("badnets", 1)
  assert run.model_options == {"width": 8} and run.ratio == 0.2 and run.seed == 1
  assert command.spec.defenses == ("ft", "fp") and command.spec.seeds == 3
  assert command.spec.train.epochs == 2


@pytest.mark.slow
def test_tiny_table_runs_then_is_reused(tmp_path, monkeypatch, capsys):
  """One attack × FT on digits: the outputs are written; a second run retrains nothing; other
  settings on the same directory are refused."""
  spec = TableSpec(dataset="digits", attacks=("badnets",), defenses=("ft",), defense_epochs=1,
                   reserved_ratio=0.1,
                   train=AttackTrainConfig(epochs=2, batch_size=64, learning_rate=0.1,
                                           cosine_t_max=2, crop_padding=1))
  result = table.run_table(spec, tmp_path, progress=False)
  assert {p.name for p in tmp_path.iterdir()} >= {"attacks", "defenses", "table.csv", "table.json",
                                                  "table.txt", "der.png"}
  assert [r["defense"] for r in result["runs"]] == ["none", "ft"]
  assert json.loads((tmp_path / "table.json").read_text())["runs"] == result["runs"]
  assert len((tmp_path / "table.csv").read_text().splitlines()) == 3

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was retrained")

  monkeypatch.setattr(runs, "write_attack", refuse)
  monkeypatch.setattr(runs, "write_defense", refuse)
  again = table.run_table(spec, tmp_path, progress=False)
  assert again["runs"] == result["runs"]
  other = TableSpec(**{**spec.__dict__, "defense_epochs": 2})
  with pytest.raises(ValueError, match="other settings"):
    table.run_table(other, tmp_path, progress=False)
  assert np.isfinite(result["cells"][-1]["der"])
