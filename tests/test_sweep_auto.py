"""The test-free choice of hyperparameters (d3jax.auto): the rule, and that it never
reads test data, the trigger or the target label (checked by API)."""
import dataclasses
import importlib
import inspect

import jax
import numpy as np
import pytest

import d3jax
from d3jax.engine import train
from d3jax.defenses import D3Config, defend
from d3jax.workflows.auto_choice import choose, choose_strongest

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


def test_choose_strongest_takes_the_smallest_lambda_within_three_standard_errors():
  # n = 100, best 0.90: budget 3·sqrt(2·0.9·0.1/100) = 0.127, so 0.78 qualifies and 0.77 does not.
  lmd = [0.5, 0.5, 1.0, 10.0]
  assert choose_strongest([0.77, 0.76, 0.80, 0.90], lmd, 100) == 2
  assert choose_strongest([0.78, 0.79, 0.80, 0.90], lmd, 100) == 1  # best of the smallest λ
  assert choose_strongest([0.78, 0.79, 0.80, 0.90], lmd, 100, standard_errors=0) == 3
  # The budget shrinks with more held-out images: at n = 10 000 it is 0.0127.
  assert choose_strongest([0.88, 0.88, 0.89, 0.90], lmd, 10_000) == 2
  # At 100% held-out accuracy the budget is that of one image in n, not zero.
  assert choose_strongest([0.975, 0.95, 1.0, 1.0], lmd, 40) == 0
  with pytest.raises(ValueError, match="one held-out accuracy and one λ"):
    choose_strongest([0.9], lmd, 100)
  with pytest.raises(ValueError, match="n_heldout"):
    choose_strongest([0.9] * 4, lmd, 0)


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
  for module, name in (("d3jax.workflows.evaluation", "evaluate"), ("d3jax.metrics", "attack_success_rate"),
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
  index = choose_strongest([c["heldout_acc"] for c in candidates], [c["lmd"] for c in candidates],
                           len(y[30:]))
  assert log["rule"] == "strongest" and log["chosen"] == index
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


def test_auto_rejects_an_unknown_rule_and_strongest_without_lambda(model, variables, tiny_set,
                                                                   rbg_key):
  x, y = tiny_set
  with pytest.raises(ValueError, match="unknown auto rule 'best'"):
    d3jax.auto("d3", model, variables, x, y, x, y, normalization=NORM, key=rbg_key, rule="best")
  with pytest.raises(ValueError, match="strongest rule chooses by λ"):
    d3jax.auto("d3", model, variables, x, y, x, y, normalization=NORM, key=rbg_key,
               grid={"eps": [0.0, 0.1]}, rule="strongest")
