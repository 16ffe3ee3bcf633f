"""Checks of defense config fields, each failing with one sentence that names the field."""
from __future__ import annotations

from typing import Any

from d3jax.train import check_schedule


def check_fields(config: Any, *, counts: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), fractions: tuple[str, ...] = (),
                 unit: tuple[str, ...] = ()) -> None:
  """The training schedule (``epochs``, ``batch_size``, and ``momentum`` in [0, 1) and
  ``crop_padding`` ≥ 0 where the config has them), then the named fields: ``counts`` integers
  ≥ 1, ``nonnegative`` ≥ 0, ``positive`` > 0, ``fractions`` in (0, 1), ``unit`` in [0, 1].

  Raises:
    ValueError: the first field out of its range.
  """
  check_schedule(config.epochs, config.batch_size)
  if not 0 <= getattr(config, "momentum", 0) < 1:
    raise ValueError(f"momentum must be in [0, 1), got {config.momentum!r}.")
  if getattr(config, "crop_padding", 0) < 0:
    raise ValueError(f"crop_padding must be ≥ 0, got {config.crop_padding!r}.")
  for name in counts:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}.")
  rules = ((nonnegative, lambda v: v >= 0, "≥ 0"), (positive, lambda v: v > 0, "> 0"),
           (fractions, lambda v: 0 < v < 1, "in (0, 1)"), (unit, lambda v: 0 <= v <= 1, "in [0, 1]"))
  for names, ok, allowed in rules:
    for name in names:
      value = getattr(config, name)
      if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def check_select(select: Any) -> None:
  """A non-empty regular expression over '/'-joined parameter paths."""
  if not isinstance(select, str) or not select:
    raise ValueError(f"select must be a non-empty regular expression over parameter paths, got "
                     f"{select!r}.")
