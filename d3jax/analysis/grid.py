"""A hyperparameter grid read as the paper reads it: the Tables 6–7 layout and ACC/ASR heat maps.

Rows come from :func:`d3jax.workflows.sweep.aggregate`: the swept hyperparameters, then each measured
column as a mean over seeds with ``<column>_std`` beside it. Fractions are shown in percent.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d3jax.analysis.plotting import pyplot, save

GREEK = {"lmd": "λ", "eps": "ε", "rho": "ρ"}
PERCENT = ("acc", "asr", "ra", "der", "heldout_acc")  # fractions, shown in percent


def _cell(row: dict, column: str) -> str:
  """``row[column]`` (in percent for fractions), with ±std when the row has several seeds."""
  if row.get(column) is None:
    return "N/A"
  scale, form = (100, ".2f") if column in PERCENT else (1, ".4g")
  value = format(scale * row[column], form)
  if row.get("seeds", 1) > 1:
    value += "±" + format(scale * row[column + "_std"], form)
  return value


def format_grid_table(rows: Sequence[dict], swept: Sequence[str],
                      columns: Sequence[str] = ("acc", "asr", "ra", "der")) -> str:
  """The Tables 6–7 layout: one line per configuration, the swept values then ACC/ASR/RA/DER
  (fractions in percent; mean±std over seeds when there are several)."""
  heads = [GREEK.get(name, name) for name in swept] + [c.upper() for c in columns]
  cells = [[f"{row[name]:g}" for name in swept] + [_cell(row, c) for c in columns] for row in rows]
  widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(heads)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
  lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
  return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
  """The rows as CSV, one line per configuration, columns in the rows' order."""
  path = Path(path)
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


def heatmap(rows: Sequence[dict], axes: Sequence[str], path: str | Path, title: str,
            columns: Sequence[str] = ("acc", "asr")) -> Path:
  """Writes :func:`heatmap_figure` as a PNG at ``path``."""
  return save(heatmap_figure(rows, axes, title, columns), path)


def heatmap_figure(rows: Sequence[dict], axes: Sequence[str], title: str,
                   columns: Sequence[str] = ("acc", "asr")) -> Any:
  """One heat map per column (ACC and ASR by default) over the swept hyperparameters: rows of each
  picture follow ``axes[0]``, its columns ``axes[1]``; a third or later axis gives one row of
  pictures per combination of its values (small multiples). Each cell is annotated with the value
  in percent (mean±std over seeds when there are several).

  Raises:
    ValueError: an axis is not a column of ``rows``, or a configuration appears twice (a swept
      hyperparameter left out of ``axes`` would hide values behind each other).
  """
  for axis in axes:
    if axis not in rows[0]:
      raise ValueError(f"heat-map axis {axis!r} is not a swept hyperparameter of these rows.")
  axes = tuple(axes)
  plane, facets = axes[:2], axes[2:]
  ys = sorted({row[plane[0]] for row in rows})
  xs = sorted({row[plane[1]] for row in rows}) if len(plane) == 2 else [None]
  groups: dict[tuple, dict[tuple[int, int], dict]] = {}
  for row in rows:
    where = groups.setdefault(tuple(row[axis] for axis in facets), {})
    spot = (ys.index(row[plane[0]]), xs.index(row[plane[1]]) if len(plane) == 2 else 0)
    if spot in where:
      raise ValueError(f"the heat map over {list(axes)} has two configurations in one cell; draw it "
                       "over every swept hyperparameter.")
    where[spot] = row
  plt = pyplot()
  fig, panels = plt.subplots(len(groups), len(columns), squeeze=False,
                             figsize=(4.2 * len(columns) + 0.6 * len(xs),
                                      len(groups) * (1.2 + 0.55 * len(ys))))
  for line, (facet, where) in zip(panels, sorted(groups.items())):
    label = ", ".join(f"{GREEK.get(axis, axis)}={value:g}" for axis, value in zip(facets, facet))
    for ax, column in zip(line, columns):
      _draw_panel(fig, ax, where, column, ys, xs, plane)
      ax.set_title(f"{label}: {column.upper()} (%)" if label else f"{column.upper()} (%)")
  fig.suptitle(title)
  return fig


def _draw_panel(fig: Any, ax: Any, where: dict[tuple[int, int], dict], column: str,
                ys: list[float], xs: list[float | None], plane: tuple[str, ...]) -> None:
  """One annotated heat map of ``column`` over the cells ``where`` (NaN where no configuration)."""
  values = np.full((len(ys), len(xs)), np.nan)
  for (i, j), row in where.items():
    values[i, j] = 100 * row[column]
  cmap = "viridis" if column == "acc" else "magma_r"
  image = ax.imshow(values, cmap=cmap, vmin=0, vmax=100, aspect="auto")
  for (i, j), row in where.items():
    colour = "white" if (values[i, j] < 50) == (column == "acc") else "black"
    ax.text(j, i, _cell(row, column), ha="center", va="center", fontsize=7, color=colour)
  ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
  ax.set_ylabel(GREEK.get(plane[0], plane[0]))
  if len(plane) == 2:
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_xlabel(GREEK.get(plane[1], plane[1]))
  else:
    ax.set_xticks([])
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
