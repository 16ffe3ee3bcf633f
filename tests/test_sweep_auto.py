"""The test-free choice of hyperparameters (d3jax.auto): the rule, and that it never
reads test data, the trigger or the target label (checked by API)."""
import dataclasses
import importlib
import inspect

import jax
import numpy as np
import pytest

import d3jax
from d3jax import train
from d3jax.defenses import D3Config, defend
from d3jax.auto_choice import choose

NORM = train.Normalization((0.5,), (0.5,))
FORBIDDEN = ("test", "trigger", "target", "backdoor", "poison", "asr")


def test_choose_takes_the_farthest_candidate_within_budget_of_the_best():
  acc = [0.90, 0.88, 0.80, 0.91]
  dist = [1.0, 5.0, 9.0, 0.5]
  assert choose(acc, dist, 0.0) == 3  # only the best qualifies
  assert choose(acc, dist, 0.03) == 1  # 0.88 ≥ 0.91 − 0.03; 0.80 does not
  assert choose(acc, dist, 0.2) == 2
  assert choose([0.5, 0.5], [2.0, 2.0], 0.0) == 0
  with pytest.raises(ValueError, match="budget"):
    choose(acc, dist, -0.1)
  with pytest.raises(ValueError, match="one held-out accuracy and one distance"):
    choose(acc, dist[:2], 0.1)


def test_auto_takes_no_test_data_trigger_or_target():
  """By signature: nothing a defender does not have can be passed in."""
  for parameter in inspect.signature(d3jax.auto).parameters:
    assert not any(word in parameter.lower() for word in FORBIDDEN), parameter


@pytest.mark.slow
def test_auto_never_calls_evaluation_and_returns_the_chosen_run(model, variables, tiny_set, rbg_key,
                                                                 monkeypatch):
  """Evaluation, triggers and poisoning raise if called; auto still chooses, and its variables
  are the run `defend` gives with the chosen config and the same key."""
  def forbidden(*args, **kwargs):
    raise AssertionError("the auto rule read evaluation-only data")
  for module, name in (("d3jax.evaluation", "evaluate"), ("d3jax.metrics", "attack_success_rate"),
                       ("d3jax.metrics", "robust_accuracy"), ("d3jax.attacks.poison", "apply_trigger"),
                       ("d3jax.attacks.poison", "backdoor_test_set")):
    monkeypatch.setattr(importlib.import_module(module), name, forbidden)
  x, y = tiny_set
  config = D3Config(epochs=1, batch_size=16, crop_padding=0)
  chosen, log = d3jax.auto("d3", model, variables, x[:30], y[:30], x[30:], y[30:],
                           normalization=NORM, key=rbg_key,
                           grid={"lmd": [0.5, 10.0], "eps": [0.0, 0.3]}, config=config,
                           budget=0.1, progress=False)
  candidates = log["candidates"]
  assert [(c["lmd"], c["eps"]) for c in candidates] == [(0.5, 0.0), (0.5, 0.3), (10.0, 0.0),
                                                        (10.0, 0.3)]
  index = choose([c["heldout_acc"] for c in candidates], [c["distance"] for c in candidates], 0.1)
  assert log["chosen"] == index
  assert log["config"] == dataclasses.replace(config, lmd=candidates[index]["lmd"],
                                              eps=candidates[index]["eps"])
  alone, _ = defend("d3", model, variables, x[:30], y[:30], normalization=NORM, key=rbg_key,
                    config=log["config"], progress=False)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(chosen)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_auto_needs_a_grid_for_defenses_other_than_d3(model, variables, tiny_set, rbg_key):
  x, y = tiny_set
  with pytest.raises(ValueError, match="auto needs a grid"):
    d3jax.auto("ft", model, variables, x, y, x, y, normalization=NORM, key=rbg_key)
