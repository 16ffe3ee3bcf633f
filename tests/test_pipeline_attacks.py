"""Every registered attack through ``d3jax attack --attack NAME`` and back through ``runs.load``
(digits, width-4 small CNN, one epoch, small crafting budgets), label-mode defaults and refusals,
and the untargeted ASR (D3 supplement Sec. 8.6, Table 11) in every table row."""
import dataclasses
import json

import numpy as np
import pytest

from d3jax import attacks, cli
from d3jax.rundirs import curves, runs
from d3jax.workflows import pipeline
from d3jax.attacks import untargeted_success_rate
from d3jax.workflows.pipeline import AttackRun
from d3jax.engine.train import predict

TINY = ["--dataset", "digits", "--model-options", "width", "4", "--epochs", "1", "--batch-size", "64",
        "--eval-every", "0", "--quiet"]
# Crafting budgets that take seconds (LF and TrojanNN craft against a one-epoch clean model); SIG
# poisons 5% of the set, as digits' class 0 holds under 10% of it.
EXTRA = {
    "lf": ["--attack-options", "num_images", "8", "eval_per_class", "2", "max_iter", "5",
           "max_passes", "1"],
    "sig": ["--ratio", "0.05"],
    "ssba": ["--attack-options", "bits", "8", "width", "4", "steps", "5", "batch_size", "16"],
    "trojannn": ["--attack-options", "steps", "5"],
    "input_aware": ["--attack-options", "width", "4", "depth", "1", "mask_epochs", "1"],
}


def _attack(out, name):
  return cli.main(["attack", "--out", str(out), "--attack", name, *TINY, *EXTRA.get(name, [])])


@pytest.mark.slow
@pytest.mark.parametrize("name", attacks.names())
def test_every_registered_attack_writes_a_run_that_loads(name, tmp_path, capsys):
  """``d3jax attack --attack NAME`` trains with the attack's own trigger and program, writes a run,
  and ``runs.load`` rebuilds it (the trigger crafted again from the seed) to the same row."""
  out = tmp_path / name
  assert _attack(out, name) == 0, capsys.readouterr().err
  config = json.loads((out / "config.json").read_text())["attack"]
  assert config["attack"] == name
  assert config["label_mode"] == attacks.get(name).label_modes[0]
  epochs = [row["epoch"] for row in curves.read_rows(out / "metrics.csv")]  # the per-epoch callback ran
  assert epochs == [1]
  loaded = runs.load(out)
  row = loaded.measure()
  written = json.loads((out / "metrics.json").read_text())
  assert row["attack"] == name
  for metric in ("acc", "asr", "ra"):
    assert row[metric] == pytest.approx(written[metric], abs=1e-6), metric


def test_sig_defaults_to_clean_label_and_refuses_other_modes(capsys):
  assert AttackRun(attack="sig").mode == "clean_label"
  assert AttackRun(attack="sig").to_json()["label_mode"] == "clean_label"
  assert AttackRun(attack="badnets").mode == "all2one"
  assert AttackRun(attack="adaptive", attack_options={"base": "sig"}).mode == "clean_label"
  with pytest.raises(ValueError, match=r"^label_mode must be one the wanet attack supports "
                                       r"\(all2one, all2all\), got 'untargeted'\.$"):
    AttackRun(attack="wanet", label_mode="untargeted")
  assert cli.main(["attack", "--out", "never", "--attack", "sig", "--label-mode", "all2one",
                   "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err == ("d3jax: error: label_mode must be one the sig attack supports (clean_label), got "
                 "'all2one'.\n")


def test_untargeted_rows_use_the_untargeted_success_rate(tmp_path, capsys):
  """The row's ASR is the misclassification rate among originally correct samples, not the share
  predicted as the (true) label of the backdoor test set."""
  out = tmp_path / "untargeted"
  assert cli.main(["attack", "--out", str(out), "--label-mode", "untargeted", *TINY]) == 0
  written = json.loads((out / "metrics.json").read_text())
  backdoored = runs.load(out).backdoored
  model, variables, norm = backdoored.model, backdoored.variables, backdoored.normalization
  clean = predict(model, variables, backdoored.dataset.x_test, norm)
  triggered = predict(model, variables, backdoored.backdoor_test.x, norm)
  expected = untargeted_success_rate(clean, triggered, backdoored.dataset.y_test)
  assert written["asr"] == pytest.approx(expected, abs=1e-6)
  assert backdoored.baseline.asr == pytest.approx(expected, abs=1e-6)
  assert written["ra"] == pytest.approx(np.mean(triggered == backdoored.dataset.y_test), abs=1e-6)
  assert "badnets" in capsys.readouterr().out


SSBA_TINY = ["--attack-options", "bits", "8", "width", "4", "steps", "5", "batch_size", "16"]


def _same_sets(a, b):
  for field in a._fields:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.slow
def test_a_loaded_run_uses_its_stored_backdoor_test_set(tmp_path, monkeypatch):
  """An attack run stores its backdoor test set (uint8, in the manifest); loading it equals the
  freshly built set without building the trigger again, and a run written before the set was
  stored (no file) still loads by rebuilding it."""
  out = tmp_path / "ssba"
  assert cli.main(["attack", "--out", str(out), "--attack", "ssba", *TINY, *SSBA_TINY]) == 0
  manifest = json.loads((out / "manifest.json").read_text())["sha256"]
  assert runs.BACKDOOR_TEST in manifest and not any(k.startswith("trigger/") for k in manifest)
  run = AttackRun.from_json(json.loads((out / "config.json").read_text())["attack"])
  fresh = pipeline.prepare(run, progress=False)[3]

  def refuse(*args, **kwargs):
    raise AssertionError("the trigger was built again")

  with monkeypatch.context() as patch:
    patch.setattr(pipeline, "build_trigger", refuse)
    stored = runs.load(out).backdoored.backdoor_test
  assert stored.x.dtype == np.uint8
  _same_sets(stored, fresh)
  (out / runs.BACKDOOR_TEST).unlink()  # an older run: no stored set
  del manifest[runs.BACKDOOR_TEST]
  (out / "manifest.json").write_text(json.dumps({"sha256": manifest}))
  _same_sets(runs.load(out).backdoored.backdoor_test, fresh)


@pytest.mark.slow
def test_input_aware_run_stores_its_generators(tmp_path, monkeypatch):
  """An input-aware run's backdoor test set comes from its trained generators, which the run
  saves: the reloaded trigger rebuilds exactly the stored set; a defense run stores the set too."""
  out = tmp_path / "input_aware"
  assert _attack(out, "input_aware") == 0
  assert "input_aware mask pre-training epoch 1/" in (out / "log.txt").read_text()
  assert (out / "gallery.png").is_file()  # the trained trigger's gallery
  monkeypatch.setattr(pipeline, "build_trigger", lambda *a, **k: 1 / 0)
  loaded = runs.load(out)
  bd = loaded.backdoored.backdoor_test
  dataset = loaded.backdoored.dataset
  keep = dataset.y_test != 0
  np.testing.assert_array_equal(bd.y_orig, dataset.y_test[keep])
  assert (bd.y == 0).all() and not np.array_equal(bd.x, dataset.x_test[keep])
  # The stored set was generated batch by batch inside the run; regenerating it in one call may
  # reassociate the generator's float sums, which moves a pixel sitting on a rounding boundary by
  # one grey level (2 of 83,968 pixels on an AMD EPYC, family 23 model 1). Any real mismatch (wrong generator,
  # wrong normalisation) changes most pixels by far more.
  trigger = runs.load_trigger(loaded)
  difference = np.abs(np.asarray(trigger(dataset.x_test[keep]), np.int16) - bd.x.astype(np.int16))
  assert difference.max() <= 1 and np.mean(difference > 0) < 1e-3, (difference.max(), np.mean(difference > 0))
  defended = tmp_path / "defended"
  assert cli.main(["defend", "--attack-run", str(out), "--out", str(defended), "ft", "--epochs", "1",
                   "--batch-size", "32", "--reserved.ratio", "0.1", "--quiet"]) == 0
  _same_sets(runs.load(defended).backdoored.backdoor_test, bd)
  with pytest.raises(ValueError, match="the ssba attack has no trained trigger"):
    runs.load_trigger(dataclasses.replace(loaded, backdoored=dataclasses.replace(
        loaded.backdoored, run=AttackRun(attack="ssba"))))
