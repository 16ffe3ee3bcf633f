"""Matplotlib on the Agg backend (no display needed) and the one way figures are saved."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
  """``matplotlib.pyplot`` with the Agg backend (imported on first use: plotting is optional)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig: Any, path: str | Path) -> Path:
  """Writes ``fig`` as a PNG at ``path`` (parents created) and closes it."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return path
