"""Checks of defense config fields, each failing with one sentence that names the field."""
from __future__ import annotations

from typing import Any

from d3jax.engine.train import check_positive_int, check_recipe_fields


def check_fields(config: Any, *, counts: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), fractions: tuple[str, ...] = (),
                 unit: tuple[str, ...] = ()) -> None:
  """The recipe checks of :func:`d3jax.engine.train.check_recipe_fields` (``epochs``, ``batch_size``,
  ``crop_padding``, ``momentum`` where the config has one, and ``nonnegative`` ≥ 0), then the
  named fields: ``counts`` integers ≥ 1, ``positive`` > 0, ``fractions`` in (0, 1), ``unit`` in
  [0, 1].

  Raises:
    ValueError: the first field out of its range.
  """
  if hasattr(config, "momentum"):
    check_recipe_fields(config, nonnegative)
  else:  # plain SGD (Super-FT) or Adam (i-BAU): no momentum field
    check_recipe_fields(_NoMomentum(config), nonnegative)
  for name in counts:
    check_positive_int(name, getattr(config, name))
  rules = ((positive, lambda v: v > 0, "> 0"), (fractions, lambda v: 0 < v < 1, "in (0, 1)"),
           (unit, lambda v: 0 <= v <= 1, "in [0, 1]"))
  for names, ok, allowed in rules:
    for name in names:
      value = getattr(config, name)
      if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


class _NoMomentum:
  """A config seen with momentum 0, for the shared recipe checks."""
  momentum = 0.0

  def __init__(self, config: Any):
    self._config = config

  def __getattr__(self, name: str) -> Any:
    return getattr(self._config, name)


def check_select(select: Any) -> None:
  """A non-empty regular expression over '/'-joined parameter paths."""
  if not isinstance(select, str) or not select:
    raise ValueError(f"select must be a non-empty regular expression over parameter paths, got "
                     f"{select!r}.")
