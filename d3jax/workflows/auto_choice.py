"""Choosing a defense's hyperparameters without test data: ``d3jax.auto(...)``.

A layer above both :mod:`d3jax.workflows.sweep` and :mod:`d3jax.defenses`: it runs a grid with the first
and resolves configs with the second.

The D3 paper names the choice of λ and ε as its open problem (§5, "Limitations"; Tables 6–7 show
that lowering ε or raising λ buys clean accuracy with attack success). A defender cannot measure
ASR: it has the model and the reserved clean set, nothing else. The rule here uses only that.

Two rules, both on the same grid run (one vmapped program, :func:`d3jax.workflows.sweep.sweep`) trained on
the training part of the reserved set and measured on its held-out part:

**``strongest``** (the default for D3; needs ``lmd`` in the grid). D3's λ is its strength knob:
the hinge term weighs λ/(λ + 1) of the normalised loss, the distance term 1/(λ + 1), so a smaller
λ pushes the weights farther from the backdoored ones (the paper's Table 7: λ trades attack
success for clean accuracy). The rule takes the smallest λ of the grid that has a candidate whose
held-out accuracy is not distinguishably below the grid's best: within ``standard_errors`` (3)
standard errors of a difference of two accuracies measured on the same n held-out images,
``3 · sqrt(2 p (1 − p) / n)`` with p the best held-out accuracy; within that λ, the candidate of
highest held-out accuracy (ties: the first in grid order). The budget so scales with what a small
held-out set can tell apart — 100 CIFAR images at 60% accuracy cannot separate 55% from 65% —
instead of a fixed number of points.

It was designed on the per-candidate records of 54 cases (mnist5k and 16×16 digits, 9 attacks,
3 seeds, the 3 × 3 and 5 × 6 λ × ε grids of the paper's Tables 6–7, held-out parts of 40 and 14
images): on them its mean DER is 78.3 against 77.7 for the ``farthest`` rule below with budget
0.02, with 5 failures (ASR above 20% or DER more than 5 points below the grid's best) against 6.
It was committed before any CIFAR-10 case was run with it.

**``farthest``** (any defense). The distance the selected weights moved from the given model,
d(θ_s, θ_init,s) (the quantity D3 maximises, Eq. (3) of the paper; the config's ``select`` and
``norm``, or every parameter in the Frobenius norm for a defense without them): among the
candidates whose held-out accuracy is within ``budget`` of the best held-out accuracy in the grid,
the one that moved farthest (ties: the higher held-out accuracy). Distances are not comparable
across λ (a larger λ moves less by construction), which is why D3 defaults to ``strongest``.

The reference of both is the grid's best held-out accuracy, not the given model's: in the usual
benchmark protocol (BackdoorBench's) the reserved set is drawn from the data the model was
trained on, so the original model's held-out accuracy is that of memorised samples and no
fine-tuned candidate could be compared with it fairly.

Nothing here takes test data, a trigger or a target label; the tests check this by API.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from d3jax import optim
from d3jax.defenses import check_reserved, resolve
from d3jax.metrics import accuracy
from d3jax.workflows.sweep import sweep
from d3jax.engine.train import Normalization, predict

# The ranges of the paper's Tables 6 (ε) and 7 (λ).
D3_GRID = {"lmd": [1.0, 10.0, 20.0, 30.0, 40.0], "eps": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}
DEFAULT_BUDGET = 0.02
DEFAULT_STANDARD_ERRORS = 3.0
RULES = ("strongest", "farthest")


def weight_distance(config: Any, initial: Any, defended: Any) -> float:
  """d(θ_s, θ_init,s) over the config's ``select`` in its ``norm`` (every parameter, Frobenius,
  for a defense without them); see :func:`d3jax.optim.distance`."""
  select = getattr(config, "select", ".*")
  norm = getattr(config, "norm", "fro")
  return float(optim.distance(defended["params"], initial["params"], select, norm))


def heldout_accuracy(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
                     normalization: Normalization) -> float:
  """Eval-mode accuracy on the held-out part of the reserved set."""
  return accuracy(predict(model, variables, images, normalization), labels)


def choose(heldout_acc: Sequence[float], distance: Sequence[float], budget: float) -> int:
  """The index chosen by the rule of this module: the largest distance among the candidates whose
  held-out accuracy is ≥ max(held-out accuracy) − ``budget`` (ties: the higher accuracy)."""
  if not 0 <= budget <= 1:
    raise ValueError(f"budget must be a fraction in [0, 1] of held-out accuracy, got {budget!r}.")
  heldout_acc, distance = np.asarray(heldout_acc, float), np.asarray(distance, float)
  if heldout_acc.shape != distance.shape or heldout_acc.size == 0:
    raise ValueError(f"need one held-out accuracy and one distance per candidate, got "
                     f"{heldout_acc.size} and {distance.size}.")
  feasible = np.flatnonzero(heldout_acc >= heldout_acc.max() - budget - 1e-9)
  return int(max(feasible, key=lambda i: (distance[i], heldout_acc[i])))


def choose_strongest(heldout_acc: Sequence[float], lmd: Sequence[float], n_heldout: int,
                     standard_errors: float = DEFAULT_STANDARD_ERRORS) -> int:
  """The index chosen by the ``strongest`` rule (module docstring): the smallest λ with a
  candidate within ``standard_errors`` · sqrt(2 p (1 − p) / n) of the best held-out accuracy p,
  then that λ's most accurate candidate."""
  heldout_acc, lmd = np.asarray(heldout_acc, float), np.asarray(lmd, float)
  if heldout_acc.shape != lmd.shape or heldout_acc.size == 0:
    raise ValueError(f"need one held-out accuracy and one λ per candidate, got "
                     f"{heldout_acc.size} and {lmd.size}.")
  if n_heldout < 1 or standard_errors < 0:
    raise ValueError(f"need n_heldout ≥ 1 and standard_errors ≥ 0, got {n_heldout} and "
                     f"{standard_errors}.")
  best = heldout_acc.max()
  p = min(max(best, 0.5 / n_heldout), 1 - 0.5 / n_heldout)  # a zero-width budget at 0% or 100%
  budget = standard_errors * np.sqrt(2 * p * (1 - p) / n_heldout)
  feasible = np.flatnonzero(heldout_acc >= best - budget - 1e-9)
  strongest = feasible[lmd[feasible] == lmd[feasible].min()]
  return int(strongest[np.argmax(heldout_acc[strongest])])


def auto(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
         heldout_images: np.ndarray, heldout_labels: np.ndarray, *, normalization: Normalization,
         key: jax.Array, grid: Mapping[str, Sequence[float]] | None = None, config: Any = None,
         rule: str | None = None, budget: float = DEFAULT_BUDGET,
         standard_errors: float = DEFAULT_STANDARD_ERRORS, chunk_size: int | None = None, progress: bool = True
         ) -> tuple[Any, dict[str, Any]]:
  """Runs defense ``name`` for every point of ``grid`` on the reserved (images, labels) and
  returns the variables of the point chosen with the held-out part only (see the module
  docstring for the rule).

  ``grid`` defaults to the paper's λ × ε ranges for ``d3`` (:data:`D3_GRID`) and must be given
  for other defenses. ``rule`` (:data:`RULES`) defaults to ``strongest`` when the grid sweeps
  ``lmd`` and to ``farthest`` otherwise; ``budget`` is the ``farthest`` rule's, ``standard_errors``
  the ``strongest`` rule's. Every candidate shares ``key`` (the run :func:`d3jax.defenses.defend` with
  the chosen config and that key would give).

  Returns the chosen variables and a log: the candidates (hyperparameters, held-out accuracy,
  distance), the chosen index, its config, the rule with its budget and standard errors, and the
  reference accuracy.
  """
  config = resolve(name, config)
  if grid is None:
    if name != "d3":
      raise ValueError(f"auto needs a grid for defense {name!r}; the default grid is D3's λ × ε.")
    grid = D3_GRID
  rule = rule or ("strongest" if "lmd" in grid else "farthest")
  if rule not in RULES:
    raise ValueError(f"unknown auto rule {rule!r}; choose one of {RULES}.")
  if rule == "strongest" and "lmd" not in grid:
    raise ValueError("the strongest rule chooses by λ; give a grid with 'lmd' or rule='farthest'.")
  heldout_images, heldout_labels = check_reserved(model, variables, heldout_images, heldout_labels)
  defended, log = sweep(name, model, variables, images, labels, normalization=normalization,
                        key=key, grid=grid, config=config, chunk_size=chunk_size, progress=progress)
  heldout = [heldout_accuracy(model, v, heldout_images, heldout_labels, normalization)
             for v in defended]
  distance = [weight_distance(config, variables, v) for v in defended]
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  if rule == "strongest":
    index = choose_strongest(heldout, [p["lmd"] for p in points], len(heldout_labels),
                             standard_errors)
  else:
    index = choose(heldout, distance, budget)
  candidates = [{**point, "heldout_acc": acc, "distance": dist}
                for point, acc, dist in zip(points, heldout, distance)]
  chosen = dataclasses.replace(config, **{k: float(v) for k, v in points[index].items()})
  return defended[index], {"defense": name, "grid": log["grid"], "candidates": candidates,
                           "chosen": index, "config": chosen, "rule": rule, "budget": budget,
                           "standard_errors": standard_errors,
                           "reference_acc": max(heldout)}
