"""Choosing the parameters that D3 measures and projects (DESIGN.md "The D3 optimizer").

A selection is either a regular expression matched (``re.fullmatch``) against '/'-joined
parameter paths such as ``"linear/kernel"`` or ``"layer4_.*/kernel"``, or a pytree of Python
booleans with the structure of the params. It resolves to a boolean pytree mask.
"""
from __future__ import annotations

import re
from typing import Any, Union

import jax

PyTree = Any
Selection = Union[str, PyTree]


def key_name(entry: Any) -> str:
  """The readable name of one entry of a jax key path."""
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def path_string(key_path: tuple) -> str:
  """'/'-joined names of a jax key path, e.g. ``('params', 'linear', 'kernel')`` → ``params/linear/kernel``."""
  return "/".join(key_name(entry) for entry in key_path)


def param_paths(tree: PyTree) -> list[str]:
  """All leaf paths of ``tree`` in flattening order."""
  return [path_string(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def select_mask(tree: PyTree, select: Selection) -> PyTree:
  """Resolves ``select`` against ``tree`` into a pytree of Python booleans.

  Raises:
    ValueError: a regex that matches no path (the message lists the paths there are), a
      boolean pytree whose structure differs from ``tree``, a selection of nothing, or a
      ``flax.nnx`` State (whose leaves are Variable wrappers, not arrays).
  """
  if type(tree).__module__.startswith("flax.nnx"):
    raise ValueError(
        "got a flax.nnx State; pass plain arrays instead: nnx.to_pure_dict(nnx.state(model, "
        "nnx.Param)) as params and reference, and write results back with "
        "nnx.replace_by_pure_dict.")
  if isinstance(select, str):
    try:
      pattern = re.compile(select)
    except re.error as err:
      raise ValueError(f"select={select!r} is not a valid regular expression: {err}") from err
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: pattern.fullmatch(path_string(path)) is not None, tree)
    if not any(jax.tree.leaves(mask)):
      paths = param_paths(tree)
      shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
      raise ValueError(
          f"select={select!r} matched no parameter path (matching is re.fullmatch on "
          f"'/'-joined paths). Paths are: {shown}")
    return mask
  if jax.tree.structure(select) != jax.tree.structure(tree):
    raise ValueError(
        "a pytree select mask must have the structure of the params: got "
        f"{jax.tree.structure(select)}, expected {jax.tree.structure(tree)}.")
  leaves = jax.tree.leaves(select)
  if not all(isinstance(leaf, bool) for leaf in leaves):
    raise ValueError("a pytree select mask must hold Python booleans (True = selected).")
  if not any(leaves):
    raise ValueError("the select mask selects no parameter.")
  return select
