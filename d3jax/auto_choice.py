"""Choosing a defense's hyperparameters without test data: ``d3jax.auto(...)``.

A layer above both :mod:`d3jax.sweep` and :mod:`d3jax.defenses`: it runs a grid with the first
and resolves configs with the second.

The D3 paper names the choice of λ and ε as its open problem (§5, "Limitations"; Tables 6–7 show
that lowering ε or raising λ buys clean accuracy with attack success). A defender cannot measure
ASR: it has the model and the reserved clean set, nothing else. The rule here uses only that.

**The rule.** Split the reserved set into a training part and a held-out part. Train every point
of a grid on the training part (one vmapped program, :func:`d3jax.sweep.sweep`). For each
candidate measure two things a defender can see: the clean accuracy on the held-out part, and
the distance its selected weights moved from the given model, d(θ_s, θ_init,s) (the quantity D3
maximises, Eq. (3) of the paper; the config's ``select`` and ``norm``, or every parameter in the
Frobenius norm for a defense without them). Among the candidates whose held-out accuracy is within
``budget`` of the best held-out accuracy in the grid, choose the one that moved farthest (ties:
the higher held-out accuracy). The best candidate itself always qualifies, so a choice exists.

The reference is the grid's best held-out accuracy, not the given model's: in the usual
benchmark protocol (BackdoorBench's) the reserved set is drawn from the data the model was
trained on, so the original model's held-out accuracy is that of memorised samples and no
fine-tuned candidate could be compared with it fairly. The held-out part is small (10% of a 5%
reserved set is 25 MNIST images), so the accuracy it gives moves in coarse steps; a budget below
one step means "as accurate as the best".

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
from d3jax.sweep import sweep
from d3jax.train import Normalization, predict

# The ranges of the paper's Tables 6 (ε) and 7 (λ).
D3_GRID = {"lmd": [1.0, 10.0, 20.0, 30.0, 40.0], "eps": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]}
DEFAULT_BUDGET = 0.02


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


def auto(name: str, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
         heldout_images: np.ndarray, heldout_labels: np.ndarray, *, normalization: Normalization,
         key: jax.Array, grid: Mapping[str, Sequence[float]] | None = None, config: Any = None,
         budget: float = DEFAULT_BUDGET, chunk_size: int | None = None, progress: bool = True
         ) -> tuple[Any, dict[str, Any]]:
  """Runs defense ``name`` for every point of ``grid`` on the reserved (images, labels) and
  returns the variables of the point chosen with the held-out part only (see the module
  docstring for the rule).

  ``grid`` defaults to the paper's λ × ε ranges for ``d3`` (:data:`D3_GRID`) and must be given
  for other defenses. Every candidate shares ``key`` (the run :func:`d3jax.defenses.defend` with
  the chosen config and that key would give).

  Returns the chosen variables and a log: the candidates (hyperparameters, held-out accuracy,
  distance), the chosen index, its config, the budget and the reference accuracy.
  """
  config = resolve(name, config)
  if grid is None:
    if name != "d3":
      raise ValueError(f"auto needs a grid for defense {name!r}; the default grid is D3's λ × ε.")
    grid = D3_GRID
  heldout_images, heldout_labels = check_reserved(model, variables, heldout_images, heldout_labels)
  defended, log = sweep(name, model, variables, images, labels, normalization=normalization,
                        key=key, grid=grid, config=config, chunk_size=chunk_size, progress=progress)
  heldout = [heldout_accuracy(model, v, heldout_images, heldout_labels, normalization)
             for v in defended]
  distance = [weight_distance(config, variables, v) for v in defended]
  index = choose(heldout, distance, budget)
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  candidates = [{**point, "heldout_acc": acc, "distance": dist}
                for point, acc, dist in zip(points, heldout, distance)]
  chosen = dataclasses.replace(config, **{k: float(v) for k, v in points[index].items()})
  return defended[index], {"defense": name, "grid": log["grid"], "candidates": candidates,
                           "chosen": index, "config": chosen, "budget": budget,
                           "reference_acc": max(heldout)}
