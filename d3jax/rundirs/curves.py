"""Per-epoch curves of a run: ``metrics.csv``, its plot, and the divergence check.

One row per epoch: the training loss; what the defender may see (loss and accuracy on the
held-out part of the reserved set, defense runs only); and, for evaluation only, ACC/ASR/RA on
the test sets every ``eval_every`` epochs. Cells that were not measured are empty.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ("epoch", "train_loss", "heldout_loss", "heldout_acc", "acc", "asr", "ra", "wall_s")
# A loss this many times its first-epoch value (or a non-finite one) counts as diverged.
DIVERGENCE_FACTOR = 100.0


def append_row(path: Path, row: dict) -> None:
  """Appends one epoch to the CSV at ``path`` (writing the header first if the file is new)."""
  unknown = set(row) - set(COLUMNS)
  if unknown:
    raise ValueError(f"unknown metrics.csv columns {sorted(unknown)}; allowed: {COLUMNS}.")
  new = not path.exists()
  with path.open("a", newline="") as f:
    writer = csv.DictWriter(f, COLUMNS)
    if new:
      writer.writeheader()
    writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def read_rows(path: Path) -> list[dict]:
  """The rows of a metrics CSV as dicts of floats (None for empty cells; epoch as int)."""
  if not path.exists():
    return []
  with path.open(newline="") as f:
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) != COLUMNS:
      raise ValueError(f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}.")
    return [{k: (int(v) if k == "epoch" else float(v)) if v != "" else None for k, v in r.items()}
            for r in reader]


def keep_epochs(path: Path, last_epoch: int) -> list[dict]:
  """Drops the rows after ``last_epoch`` (written after the last checkpoint); returns the rest."""
  rows = [r for r in read_rows(path) if r["epoch"] <= last_epoch]
  path.unlink(missing_ok=True)
  for row in rows:
    append_row(path, row)
  return rows


def loss_diverged(losses: list[float]) -> str | None:
  """A warning when the training loss grew by orders of magnitude (or stopped being finite)."""
  if not losses:
    return None
  first = max(losses[0], 1e-3)
  worst = max(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
  if not math.isfinite(losses[worst]) or losses[worst] >= DIVERGENCE_FACTOR * first:
    return (f"training diverged: the loss went from {losses[0]:.4g} in epoch 1 to "
            f"{losses[worst]:.4g} in epoch {worst + 1}; lower the learning rate.")
  return None


def at_chance(accuracy: float, num_classes: int, what: str) -> str | None:
  """A warning when ``accuracy`` on the model's own training data is no better than chance."""
  if accuracy <= 1.5 / num_classes:
    return (f"the model is at chance on {what} (accuracy {accuracy:.3f}, chance "
            f"{1 / num_classes:.3f}); the training diverged or the settings are wrong.")
  return None


def plot(csv_path: Path, png_path: Path, title: str) -> Path:
  """Draws the curves of ``csv_path`` (loss on the left, accuracies on the right) as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  rows = read_rows(csv_path)
  fig, (loss_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, columns, label in ((loss_ax, ("train_loss", "heldout_loss"), "loss"),
                             (rate_ax, ("heldout_acc", "acc", "asr", "ra"), "fraction")):
    for column in columns:
      points = [(r["epoch"], r[column]) for r in rows if r[column] is not None]
      if points:
        ax.plot(*zip(*points), marker="o", markersize=3, label=column)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(label)
    if ax.lines:
      ax.legend()
  rate_ax.set_ylim(-0.02, 1.02)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path
