"""Interleaved timing shared by the benchmark scripts (no PyTorch needed)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(sides: dict[str, Callable[[], object]], rounds: int, steps: int = 1
                ) -> dict[str, float]:
  """Median seconds per call of each side, after one warm-up call each; the sides alternate
  within every round (``steps`` calls of a side per round), so load changes hit them alike.
  Each side must block until its result is ready."""
  times: dict[str, list[float]] = {name: [] for name in sides}
  for fn in sides.values():
    fn()
  for _ in range(rounds):
    for name, fn in sides.items():
      for _ in range(steps):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}
