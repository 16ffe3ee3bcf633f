"""The README example, the command line (attack → defend through run directories) and the demo's
output format, on tiny settings."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from d3jax import cli, demo
from d3jax.attacks.training import AttackTrainConfig
from d3jax.defenses import D3Config, FTConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_moves_the_head():
  """The README's 'D3 on your own Flax model' block runs as written and prints a positive distance."""
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
  import d3jax
  reference = namespace["model"].init(namespace["jax"].random.key(2), namespace["x"])["params"]
  moved = float(d3jax.optim.distance(namespace["params"], reference, "head/kernel"))
  assert moved > 0.1
  norm = d3jax.optim.tensor_norm
  assert abs(float(norm(namespace["params"]["head"]["kernel"], "fro"))
             - float(norm(reference["head"]["kernel"], "fro"))) < 1e-4


@pytest.mark.slow
def test_attack_then_defend_through_run_directories(tmp_path, capsys):
  """`d3jax attack` writes a run directory that `d3jax defend` reads; metrics carry DER."""
  attack_dir, defend_dir = tmp_path / "attack", tmp_path / "defend"
  cli.main(["attack", "--out", str(attack_dir), "--dataset", "digits", "--width", "4",
            "--epochs", "1", "--batch-size", "64"])
  saved = json.loads((attack_dir / "metrics.json").read_text())
  assert set(saved) == {"acc", "asr", "ra"}
  cli.main(["defend", "--attack-run", str(attack_dir), "--out", str(defend_dir), "--defense", "d3",
            "--epochs", "1", "--batch-size", "64", "--reserved-ratio", "0.1"])
  row = json.loads((defend_dir / "metrics.json").read_text())
  assert row["defense"] == "d3" and row["attack"] == "badnets"
  assert 0.0 <= row["der"] <= 1.0
  config = json.loads((defend_dir / "config.json").read_text())
  assert config["defense_config"]["lmd"] == 10.0
  assert "DER" in capsys.readouterr().out


def test_defend_rejects_unknown_defense(tmp_path):
  with pytest.raises(SystemExit):
    cli.main(["defend", "--attack-run", str(tmp_path), "--out", str(tmp_path / "x"), "--defense", "nope"])


@pytest.mark.slow
def test_demo_writes_the_results_table(tmp_path, monkeypatch):
  """The demo's results.json has one 'none' row and one row per defense for each attack."""
  tiny = dataclasses.replace(demo.DEMO_RUN, dataset="digits", model_options={"width": 4},
                             train=AttackTrainConfig(epochs=1, batch_size=64))
  monkeypatch.setattr(demo, "DEMO_RUN", tiny)
  monkeypatch.setattr(demo, "DEFENSES", {"ft": FTConfig(epochs=1, batch_size=64),
                                         "d3": D3Config(epochs=1, batch_size=64)})
  rows = demo.run_demo(tmp_path, progress=False)
  written = json.loads((tmp_path / "results.json").read_text())
  assert written == rows
  assert [(r["attack"], r["defense"]) for r in rows] == [
      (a, d) for a in demo.ATTACKS for d in ("none", "ft", "d3")]
  for row in rows:
    assert set(row) == {"attack", "defense", "acc", "asr", "ra", "der"}
    assert (row["der"] is None) == (row["defense"] == "none")
