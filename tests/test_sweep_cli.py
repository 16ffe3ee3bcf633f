"""`d3jax sweep`, `d3jax defend --auto` and `d3jax analyze` on a tiny attack run: the sweep's rows
follow the grid and equal the same configs run one by one; --auto writes the chosen config; every
analysis writes a non-empty PNG; bad input is one line on stderr."""
import csv
import json

import pytest

from d3jax import cli

TINY = ["--dataset", "digits", "--model-options", "width", "4", "--epochs", "1",
        "--batch-size", "64", "--quiet", "--eval-every", "0"]
DEFENSE = ["--epochs", "1", "--batch-size", "32", "--reserved.ratio", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An attack run and its FT and D3 defense runs (digits, width-4 CNN, one epoch each)."""
  root = tmp_path_factory.mktemp("sweep-runs")
  attack = root / "badnets"
  assert cli.main(["attack", "--out", str(attack), *TINY]) == 0
  for name in ("ft", "d3"):
    assert cli.main(["defend", "--attack-run", str(attack), "--out", str(root / name),
                     "--eval-every", "0", name, *DEFENSE]) == 0
  return root


def fail(argv, capsys):
  assert cli.main(argv) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("d3jax: error: "), lines
  return lines[0]


@pytest.mark.slow
def test_sweep_rows_follow_the_grid_and_equal_the_runs_done_alone(runs, capsys):
  out = runs / "grid"
  assert cli.main(["sweep", "--attack-run", str(runs / "badnets"), "--out", str(out),
                   "--grid", "lmd=1,10", "eps=0.1", "d3", *DEFENSE]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].split()[:4] == ["λ", "ε", "ACC", "ASR"] and len(printed) == 3
  with (out / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [(float(r["lmd"]), float(r["eps"])) for r in rows] == [(1.0, 0.1), (10.0, 0.1)]
  assert {"acc", "asr_std", "ra", "der", "heldout_acc", "distance"} <= set(rows[0])
  assert (out / "heatmap.png").stat().st_size > 5000
  assert not (out / "variables").exists()
  metrics = json.loads((out / "metrics.json").read_text())
  assert len(metrics["runs"]) == 2 and metrics["configs"][1]["lmd"] == 10.0
  alone = json.loads((runs / "d3" / "metrics.json").read_text())  # the defaults: λ = 10, ε = 0.1
  n_test = 364
  for column in ("acc", "asr", "ra"):
    assert float(rows[1][column]) == pytest.approx(alone[column], abs=1.5 / n_test)
  assert cli.main(["show", str(out)]) == 0
  shown = capsys.readouterr().out
  assert "kind: sweep" in shown and shown.rstrip().endswith(printed[-1].rstrip())
  assert "is a sweep run" in fail(["eval", str(out)], capsys)


@pytest.mark.slow
def test_sweep_with_seeds_reports_std_and_can_keep_the_variables(runs, capsys):
  out = runs / "seeded"
  assert cli.main(["sweep", "--attack-run", str(runs / "badnets"), "--out", str(out),
                   "--grid", "learning_rate=0.01,0.05", "--seeds", "2", "--save-variables",
                   "ft", *DEFENSE]) == 0
  assert "±" in capsys.readouterr().out
  metrics = json.loads((out / "metrics.json").read_text())
  assert [r["seed"] for r in metrics["runs"]] == [0, 1, 0, 1]
  assert all(r["seeds"] == 2 for r in metrics["configs"])
  assert (out / "variables").is_dir()


def test_defend_auto_writes_the_chosen_config(runs, capsys):
  out = runs / "auto"
  assert cli.main(["defend", "--attack-run", str(runs / "badnets"), "--out", str(out), "--auto",
                   "--auto-grid", "lmd=1,10", "--eval-every", "0", "d3", *DEFENSE]) == 0
  printed = capsys.readouterr().out
  assert "auto: chose lmd=" in printed
  chosen = float(printed.split("auto: chose lmd=")[1].split()[0].rstrip(","))
  config = json.loads((out / "config.json").read_text())
  assert config["defense"]["config"]["lmd"] == chosen


@pytest.mark.slow
def test_analyze_writes_every_png(runs, capsys):
  out = runs / "analysis"
  assert cli.main(["analyze", str(runs / "badnets"), "--defended", str(runs / "ft"),
                   str(runs / "d3"), "--out", str(out), "--samples", "15", "--images", "1",
                   "--steps", "5", "--quiet"]) == 0
  printed = capsys.readouterr().out.split()
  assert len(printed) == 5
  for name in ("path", "weights", "tsne", "gradcam", "tac"):
    assert (out / f"{name}.png").stat().st_size > 5000


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--attack-run", "{a}", "--out", "{o}", "--grid", "lmd"], "--grid entries must read"),
    (["sweep", "--attack-run", "{a}", "--out", "{o}", "--grid", "lmd=1,x"], "values must be numbers"),
    (["sweep", "--attack-run", "{a}", "--out", "{o}", "--grid", "lambda=1"], "cannot sweep"),
    (["sweep", "--attack-run", "{a}", "--out", "{o}", "--seeds", "0"], "--seeds must be ≥ 1"),
    (["defend", "--attack-run", "{a}", "--out", "{o}", "--auto", "--reserved.holdout", "0"],
     "--auto chooses with the held-out part"),
    (["analyze", "{a}", "--analyses", "path"], "pass at least one --defended run"),
    (["analyze", "{d}"], "is a defense run"),
])
def test_bad_input_is_one_line(runs, tmp_path, capsys, argv, message):
  argv = [a.format(a=runs / "badnets", o=tmp_path / "x", d=runs / "d3") for a in argv]
  assert message in fail(argv + ["--quiet"], capsys)
