"""The command line: help and config files, one-line errors for every bad input, run directories
(overwrite refusal, atomic writes, manifest, moved runs), curves, eval and show, the README."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from d3jax import cli
from d3jax.rundirs import checkpoint, curves, runs
from d3jax.workflows.pipeline import AttackRun

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--model-options", "width", "4", "--epochs", "1",
        "--batch-size", "64", "--quiet"]
TINY_DEFENSE = ["--epochs", "1", "--batch-size", "32", "--reserved.ratio", "0.1", "--quiet"]


def fail(argv, capsys):
  """Runs the CLI expecting a user error: exit status 2 and exactly one line on stderr."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("d3jax: error: ")
  return lines[0][len("d3jax: error: "):]


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
  """A finished attack run (digits, width-4 CNN, one epoch)."""
  out = tmp_path_factory.mktemp("runs") / "badnets"
  assert cli.main(["attack", "--out", str(out), "--eval-every", "0", *TINY]) == 0
  return out


@pytest.fixture(scope="module")
def defense_run(attack_run):
  out = attack_run.parent / "badnets-d3"
  assert cli.main(["defend", "--attack-run", str(attack_run), "--out", str(out), "d3",
                   *TINY_DEFENSE]) == 0
  return out


def copy_run(run, tmp_path, name="copy"):
  return Path(shutil.copytree(run, tmp_path / name))


def write_npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8),
            "y_train": np.arange(60) % 3, "x_test": rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
            "y_test": np.arange(30) % 3}
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


# -- Bad inputs: (argv, the message the user sees). Each also goes through the library below. --

PARSE_ERRORS = [
    (["attack", "--out", "x", "--ratio", "2"], "ratio must be a fraction in [0, 1], got 2.0."),
    (["attack", "--out", "x", "--ratio", "-0.1"], "ratio must be a fraction in [0, 1], got -0.1."),
    (["attack", "--out", "x", "--target", "-1"], "target must be a class index ≥ 0, got -1."),
    (["attack", "--out", "x", "--seed", "-3"], "seed must be an integer ≥ 0, got -3."),
    (["attack", "--out", "x", "--dataset", "cifar"],
     "dataset must be 'digits', 'mnist5k', 'npz:<path>' or 'tfds:<name>', got 'cifar'."),
    (["attack", "--out", "x", "--dataset", "npz:"],
     "dataset must be 'digits', 'mnist5k', 'npz:<path>' or 'tfds:<name>', got 'npz:'."),
    (["attack", "--out", "x", "--model", "resnet50"], "invalid choice 'resnet50' for argument '--model'"),
    (["attack", "--out", "x", "--attack", "refool"], "invalid choice 'refool' for argument '--attack'"),
    (["attack", "--out", "x", "--label-mode", "one2one"],
     "invalid choice 'one2one' for argument '--label-mode'"),
    (["attack", "--out", "x", "--model-options", "width", "0"],
     "small_cnn: option width must be a positive integer, got 0."),
    (["attack", "--out", "x", "--model-options", "depth", "3"],
     "small_cnn: unknown option 'depth'; valid options: width, conv, precision."),
    (["attack", "--out", "x", "--lr", "0.1"], "Unrecognized options: --lr, 0.1"),
    (["attack", "--epochs", "1"], "Required options: Missing from d3jax attack: --out STR"),
    (["attack", "--out", "x", "--epochs", "many"], "many"),
    (["defend", "--out", "x", "--attack-run", "y", "d3", "--warm-up", "far-away"],
     "invalid choice 'far-away' for argument '--warm-up'"),
    (["defend", "--out", "x", "--attack-run", "y", "--reserved.ratio", "0"],
     "reserved ratio must be a fraction in (0, 1], got 0.0."),
    (["defend", "--out", "x", "--attack-run", "y", "--reserved.ratio", "1.5"],
     "reserved ratio must be a fraction in (0, 1], got 1.5."),
    (["defend", "--out", "x", "--attack-run", "y", "--reserved.holdout", "1"],
     "holdout must be a fraction in [0, 1), got 1.0."),
    (["defend", "--out", "x", "--attack-run", "y", "sam"], "Unrecognized options: sam"),
    (["frobnicate"], "Unrecognized options: frobnicate Available subcommands: attack, defend, eval, "
                     "show, demo"),
    (["eval"], "Required options"),
]


@pytest.mark.parametrize("argv,message", PARSE_ERRORS, ids=[" ".join(a)[:60] for a, _ in PARSE_ERRORS])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
  assert message in fail(argv, capsys)


def test_parse_errors_in_a_subprocess_are_one_line():
  """The installed entry point: `python -m d3jax`, exit status 2, one line, no box."""
  done = subprocess.run([sys.executable, "-m", "d3jax", "attack", "--out", "x", "--ratio", "7"],
                        capture_output=True, text=True, check=False, timeout=120)
  assert done.returncode == 2
  assert done.stderr == "d3jax: error: ratio must be a fraction in [0, 1], got 7.0.\n"


def test_version(capsys):
  import d3jax
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out == f"d3jax {d3jax.__version__}\n"


def test_help_shows_every_config_field_with_its_default(capsys):
  from d3jax.attacks.training import AttackTrainConfig
  from d3jax.defenses import REGISTRY
  assert cli.main(["attack", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  for field in [*AttackRun.__dataclass_fields__, *AttackTrainConfig.__dataclass_fields__]:
    if field != "train":
      assert f"--{field.replace('_', '-')}" in text, field
  assert "(default: 0.1)" in text and "{small_cnn,preact_resnet18,vgg11,vgg19_bn,vit,vit_b16}" in text
  for name, config_type in REGISTRY.items():
    assert cli.main(["defend", name, "--help"]) == 0
    text = capsys.readouterr().out
    for field in config_type.__dataclass_fields__:
      assert f"--{field.replace('_', '-')}" in text, (name, field)
    assert "(default: " in text


@pytest.mark.slow
def test_a_new_registry_entry_becomes_a_subcommand():
  """A defense registered before the CLI is built gets its subcommand and flags, with no CLI code."""
  script = """if True:
    import dataclasses, sys
    from d3jax import defenses

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
      strength: float = 0.5

    defenses.REGISTRY["toy"] = ToyConfig
    from d3jax import cli
    sys.exit(cli.main(["defend", "toy", "--help"]))
  """
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert "--strength FLOAT" in done.stdout and "(default: 0.5)" in done.stdout


def test_print_config_round_trips_through_a_config_file(tmp_path, capsys):
  argv = ["defend", "--attack-run", "a", "--out", "b", "ft", "--learning-rate", "0.02",
          "--reserved.holdout", "0.2", "--print-config"]
  assert cli.main(argv) == 0
  printed = yaml.safe_load(capsys.readouterr().out)
  assert printed["defense"] == "ft" and printed["config"]["learning_rate"] == 0.02
  assert printed["reserved"]["holdout"] == 0.2
  (tmp_path / "c.yaml").write_text(yaml.safe_dump(printed))
  assert cli.main(["defend", "--config", str(tmp_path / "c.yaml"), "--attack-run", "a", "--out", "b",
                   "--epochs", "3", "--print-config"]) == 0
  again = yaml.safe_load(capsys.readouterr().out)
  assert again["config"] == {**printed["config"], "epochs": 3}
  assert again["reserved"] == printed["reserved"]
  json_file = tmp_path / "attack.json"
  json_file.write_text(json.dumps({"dataset": "digits", "train": {"epochs": 2}}))
  assert cli.main(["attack", "--config", str(json_file), "--out", "x", "--ratio", "0.2",
                   "--print-config"]) == 0
  attack = yaml.safe_load(capsys.readouterr().out)
  assert (attack["dataset"], attack["ratio"], attack["train"]["epochs"]) == ("digits", 0.2, 2)
  assert attack["train"]["batch_size"] == 128


CONFIG_FILE_ERRORS = [
    ("missing.yaml", None, "--config {dir}/missing.yaml: no such file."),
    ("bad.yaml", "ratio: [0.1\n", "--config {dir}/bad.yaml is not valid YAML or JSON"),
    ("list.yaml", "- 1\n- 2\n", "--config {dir}/list.yaml must hold a mapping of settings, got list."),
    ("unknown.yaml", "ratios: 0.1\n", "attack: unknown field(s) ['ratios']; AttackRun has dataset,"),
    ("type.yaml", "ratio: lots\n", "ratio must be a fraction in [0, 1], got 'lots'."),
    ("nested.yaml", "train: 3\n", "attack.train must be a mapping of AttackTrainConfig fields, got 3."),
    ("train.yaml", "train: {epoch: 3}\n", "attack.train: unknown field(s) ['epoch']"),
]


@pytest.mark.parametrize("name,text,message", CONFIG_FILE_ERRORS, ids=[c[0] for c in CONFIG_FILE_ERRORS])
def test_bad_config_files(name, text, message, tmp_path, capsys):
  if text is not None:
    (tmp_path / name).write_text(text)
  got = fail(["attack", "--config", str(tmp_path / name), "--out", "x"], capsys)
  assert got.startswith(message.format(dir=tmp_path)), got


DEFEND_CONFIG_ERRORS = [
    ("defense: sam\n", "--config: defense must be one of ft, d3, "),
    ("defence: d3\n", "--config: unknown setting(s) ['defence']; allowed: defense, config, reserved."),
    ("defense: d3\nconfig: {lmbda: 3}\n", "config: unknown field(s) ['lmbda']; D3Config has lmd,"),
    ("reserved: {ratio: 0}\n", "reserved ratio must be a fraction in (0, 1], got 0."),
]


@pytest.mark.parametrize("text,message", DEFEND_CONFIG_ERRORS)
def test_bad_defend_config_files(text, message, tmp_path, capsys):
  (tmp_path / "c.yaml").write_text(text)
  got = fail(["defend", "--config", str(tmp_path / "c.yaml"), "--attack-run", "a", "--out", "b"], capsys)
  assert got.startswith(message), got


@pytest.mark.slow
def test_bad_datasets_are_refused_before_training(tmp_path, capsys):
  truncated = write_npz(tmp_path / "t.npz")
  truncated.write_bytes(truncated.read_bytes()[:200])
  cases = [
      (["--dataset", f"npz:{tmp_path}/none.npz"], f"npz dataset file '{tmp_path}/none.npz' does not exist."),
      (["--dataset", f"npz:{truncated}"], f"'{truncated}' is not a readable npz file"),
      (["--dataset", f"npz:{write_npz(tmp_path / 'm.npz', y_test=None)}"], "lacks the array(s)"),
      (["--dataset", f"npz:{write_npz(tmp_path / 'o.npz', y_test=np.array([None] * 30))}"],
       "is not a readable npz file (ValueError: Object arrays cannot be loaded"),
      (["--dataset", f"npz:{write_npz(tmp_path / 'f.npz', x_train=np.zeros((60, 8, 8, 1)))}"],
       "x_train must be uint8 pixel values 0..255"),
      (["--dataset", "digits", "--target", "10"],
       "target must be a class of digits, in [0, 10), got 10."),
      (["--dataset", "digits", "--attack-options", "size", "40"],
       "BadNets size must lie in [1, 16] for (16, 16, 1), got 40."),
      (["--dataset", "digits", "--attack", "blended", "--attack-options", "alpha", "2"],
       "Blended alpha must lie in [0, 1], got 2."),
  ]
  for extra, message in cases:
    out = tmp_path / "never"
    assert message in fail(["attack", "--out", str(out), "--quiet", *extra], capsys)
    assert not out.exists() and not checkpoint.staging_dir(out).exists()


@pytest.mark.slow
def test_out_problems_are_refused_before_any_work(attack_run, tmp_path, capsys):
  before = checkpoint.verify_run(attack_run)
  a_file = tmp_path / "file"
  a_file.write_text("x")
  cases = [
      (["attack", "--out", ""], "--out must name a run directory to write, got an empty string."),
      (["attack", "--out", str(attack_run)], f"--out {attack_run} already exists; pass --overwrite"),
      (["attack", "--out", str(a_file), "--overwrite"], f"--out {a_file} is an existing file"),
      (["defend", "--attack-run", str(attack_run), "--out", str(attack_run), "--overwrite"],
       f"--out {attack_run} would overwrite the input run {attack_run}"),
      (["defend", "--attack-run", str(attack_run), "--out", str(attack_run / "sub")],
       "would overwrite the input run"),
      (["defend", "--attack-run", str(attack_run), "--out", str(attack_run.parent), "--overwrite"],
       "would overwrite the input run"),
      (["defend", "--attack-run", str(tmp_path / "nope"), "--out", str(tmp_path / "d")],
       f"no run directory at {tmp_path / 'nope'}"),
      (["eval", str(tmp_path / "nope")], f"no run directory at {tmp_path / 'nope'}"),
      (["show", str(tmp_path)], f"{tmp_path} is not a finished d3jax run (no manifest.json)"),
  ]
  for argv, message in cases:
    assert message in fail([*argv, *TINY[:-1], "--quiet"] if argv[0] == "attack" else argv, capsys)
  assert checkpoint.verify_run(attack_run) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
def test_damaged_or_edited_runs_are_refused(attack_run, defense_run, tmp_path, capsys):
  edited = copy_run(attack_run, tmp_path, "edited")
  config = json.loads((edited / "config.json").read_text())
  config["attack"]["target"] = 3
  (edited / "config.json").write_text(json.dumps(config))
  assert fail(["eval", str(edited)], capsys) == (
      f"run {edited} was modified or damaged: config.json does not match the sha256 in its manifest.")
  broken = copy_run(attack_run, tmp_path, "broken")
  victim = max((p for p in (broken / "variables").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  assert "was modified or damaged: variables/" in fail(["show", str(broken)], capsys)
  missing = copy_run(attack_run, tmp_path, "missing")
  (missing / "metrics.json").unlink()
  assert "is incomplete: metrics.json is listed in its manifest but missing." in fail(
      ["eval", str(missing)], capsys)
  unfinished = copy_run(attack_run, tmp_path, "unfinished")
  (unfinished / "manifest.json").unlink()
  assert "is not a finished d3jax run" in fail(["eval", str(unfinished)], capsys)
  bad_manifest = copy_run(attack_run, tmp_path, "bad_manifest")
  (bad_manifest / "manifest.json").write_text("{not json")
  assert "manifest.json is not valid JSON" in fail(["eval", str(bad_manifest)], capsys)
  assert f"--attack-run {defense_run} is a defense run" in fail(
      ["defend", "--attack-run", str(defense_run), "--out", str(tmp_path / "x")], capsys)


@pytest.mark.slow
def test_changed_npz_dataset_is_refused(tmp_path, capsys):
  data = write_npz(tmp_path / "data.npz")
  out = tmp_path / "run"
  assert cli.main(["attack", "--out", str(out), "--dataset", f"npz:{data}", "--model-options",
                   "width", "2", "--epochs", "1", "--batch-size", "32", "--eval-every", "0",
                   "--quiet"]) == 0
  write_npz(data, y_train=(np.arange(60) + 1) % 3)
  assert "differs from the one it was made with (sha256 changed)" in fail(["eval", str(out)], capsys)


# -- Run directories that work. --


def test_show_writes_the_trigger_gallery_without_training(tmp_path, capsys):
  from PIL import Image
  out = tmp_path / "gallery" / "badnets.png"
  assert cli.main(["attack", "--show", "--out", str(out), *TINY]) == 0
  with Image.open(out) as image:  # one row: label, then 6 × (clean | poisoned | residual) panels
    assert image.size[1] == 96 + 4 and image.size[0] > 6 * 3 * 96
  assert not (tmp_path / "gallery" / "variables").exists()
  assert "--out names the gallery PNG" in fail(["attack", "--show", "--out", str(tmp_path / "g"),
                                                *TINY], capsys)
  assert "trains with the model" in fail(["attack", "--show", "--out", str(tmp_path / "i.png"),
                                          "--attack", "input_aware", *TINY], capsys)


def test_attack_and_defense_runs(attack_run, defense_run, tmp_path, capsys):
  for run, kind in ((attack_run, "attack"), (defense_run, "defense")):
    files = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.json", "metrics.csv", "curves.png", "log.txt", "manifest.json",
            "variables"} <= files
    assert "checkpoints" not in files
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "curves.png").stat().st_size > 5000
    assert ((run / "gallery.png").is_file()) == (kind == "attack")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,heldout_loss,heldout_acc,acc,asr,ra,wall_s"
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == kind
    assert config["model"] == {"name": "small_cnn", "num_classes": 10, "options": {"width": 4},
                               "image_shape": [16, 16, 1]}
    assert config["dataset"]["source"] == "digits" and config["dataset"]["n_train"] == 1433
    assert "epoch 1/1" in (run / "log.txt").read_text()
  row = [float(v) for v in (defense_run / "metrics.csv").read_text().splitlines()[1].split(",")]
  assert row[0] == 1 and all(np.isfinite(row))  # defense: held-out and test columns filled
  metrics = json.loads((defense_run / "metrics.json").read_text())
  assert metrics["defense"] == "d3" and 0 <= metrics["der"] <= 1
  assert cli.main(["eval", str(defense_run)]) == 0
  out = capsys.readouterr().out
  assert re.search(r"badnets\s+d3\s+[\d.]+\s+[\d.]+", out)
  assert cli.main(["show", str(defense_run)]) == 0
  shown = capsys.readouterr().out
  assert "kind: defense" in shown and "lmd: 10.0" in shown and "DER" in shown


def test_moved_defense_run_loads_on_its_own(attack_run, defense_run, tmp_path, capsys):
  """No path is stored: a defense run moved elsewhere, its attack run gone, still loads."""
  moved = copy_run(defense_run, tmp_path, "moved")
  hidden = attack_run.rename(attack_run.with_name("elsewhere"))
  try:
    os.chdir(tmp_path)
    assert cli.main(["eval", "moved"]) == 0
  finally:
    hidden.rename(attack_run)
  assert str(defense_run) not in (moved / "config.json").read_text()
  table = capsys.readouterr().out
  assert table.splitlines()[1].split()[:2] == ["badnets", "d3"]


def test_overwrite_replaces_a_run_atomically(attack_run, tmp_path, capsys):
  out = copy_run(attack_run, tmp_path, "again")
  old = (out / "manifest.json").read_text()
  assert cli.main(["attack", "--out", str(out), "--overwrite", "--seed", "1", "--eval-every", "0",
                   *TINY]) == 0
  assert (out / "manifest.json").read_text() != old
  assert json.loads((out / "config.json").read_text())["attack"]["seed"] == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging or old copy left


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_that_loads(tmp_path):
  """Kill -9 during training: --out does not exist, only the hidden staging directory does."""
  out = tmp_path / "killed"
  process = subprocess.Popen(
      [sys.executable, "-m", "d3jax", "attack", "--out", str(out), *TINY[:6], "3", "--batch-size",
       "64", "--quiet"], stderr=subprocess.PIPE, text=True)
  stage = checkpoint.staging_dir(out)
  deadline = 120
  while not (stage / "metrics.csv").exists() and deadline > 0 and process.poll() is None:
    subprocess.run(["sleep", "0.2"], check=True)
    deadline -= 0.2
  process.kill()
  process.wait()
  assert not out.exists()
  assert stage.is_dir()
  with pytest.raises(FileNotFoundError):
    runs.load(out)
  with pytest.raises(ValueError, match="is not a finished d3jax run"):
    runs.load(stage)


def test_readme_example_runs_and_moves_the_head():
  """The README's 'D3 on your own Flax model' block runs as written and prints a positive distance."""
  text = (ROOT / "README.md").read_text()
  blocks = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class MyNet" in block]
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
def test_demo_writes_the_results_table(tmp_path, monkeypatch):
  """The demo's results.json has one 'none' row and one row per defense for each attack."""
  import dataclasses
  from d3jax.workflows import demo
  from d3jax.attacks.training import AttackTrainConfig
  from d3jax.defenses import D3Config, FTConfig
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


@pytest.mark.slow
def test_a_killed_defense_resumes_to_the_same_result(attack_run, tmp_path):
  """kill -9 after the second epoch's checkpoint, then --resume: the run finishes with the
  per-epoch losses and the variables of an uninterrupted run, bit for bit."""
  def argv(out, *extra):
    return ["defend", "--attack-run", str(attack_run), "--out", str(out), "--eval-every", "0",
            "--checkpoint-every", "0", *extra, "d3", "--epochs", "4", "--batch-size", "16", "--reserved.ratio", "0.1",
            "--quiet"]

  whole, killed = tmp_path / "whole", tmp_path / "killed"
  assert cli.main(argv(whole)) == 0
  process = subprocess.Popen([sys.executable, "-m", "d3jax", *argv(killed)],
                             stderr=subprocess.PIPE, text=True)
  second = checkpoint.staging_dir(killed) / "checkpoints" / "2"
  deadline = 300
  while not second.is_dir() and deadline > 0 and process.poll() is None:
    subprocess.run(["sleep", "0.1"], check=True)
    deadline -= 0.1
  process.kill()
  process.wait()
  assert second.is_dir() and not killed.exists(), "the run was not interrupted after epoch 2"
  assert cli.main(argv(killed, "--resume")) == 0
  rows = [[(r["epoch"], r["train_loss"], r["heldout_loss"]) for r in curves.read_rows(run / "metrics.csv")]
          for run in (whole, killed)]
  assert rows[0] == rows[1] and len(rows[0]) == 4
  a, b = runs.load(whole).backdoored.variables, runs.load(killed).backdoored.variables
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not (killed / "checkpoints").exists()


def test_resume_needs_an_interrupted_run_and_the_same_settings(attack_run, tmp_path, capsys):
  """--resume without an interrupted run is one line; so is resuming with other settings."""
  out = tmp_path / "fresh"
  fail(["defend", "--attack-run", str(attack_run), "--out", str(out), "--resume", "d3",
        *TINY_DEFENSE], capsys)
  stage = checkpoint.staging_dir(out)
  stage.mkdir(parents=True)
  checkpoint.save_json(stage / "config.json", {"kind": "defense", "other": 1})
  message = fail(["defend", "--attack-run", str(attack_run), "--out", str(out), "--resume", "d3",
                  *TINY_DEFENSE], capsys)
  assert "settings differ" in message


def test_an_absurd_learning_rate_is_one_line_not_garbage(attack_run, tmp_path, capsys):
  """FT at learning rate 1e6 diverges: one line naming the epoch, exit 2, and no run directory."""
  out = tmp_path / "diverged"
  message = fail(["defend", "--attack-run", str(attack_run), "--out", str(out), "--eval-every", "0",
                  "ft", "--learning-rate", "1e6", "--epochs", "3", "--batch-size", "32",
                  "--reserved.ratio", "0.1", "--quiet"], capsys)
  assert "loss became nan in epoch" in message and "lower the learning rate" in message
  assert not out.exists()
