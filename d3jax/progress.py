"""Progress of long loops: a tqdm bar on a terminal, plain lines elsewhere (CI, ``nohup``, a file),
and the point where a requested stop takes effect.

A redirected tqdm bar writes every refresh, separated by carriage returns, into the log; here, when
the stream is not a terminal, :class:`LineProgress` prints one line ``desc: i/total key=value (t s)``
at most every ``interval_s`` seconds and after the last item, so a log stays one line per report.

Stopping: a signal handler that raises can be lost (Python ignores an exception raised while a
garbage-collection callback runs, and JAX registers one), so the command line's SIGINT/SIGTERM
handlers only call :func:`request_stop`; every loop driven by :func:`progress_bar` raises
``KeyboardInterrupt`` before its next item, i.e. between two epochs.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

INTERVAL_S = 10.0  # seconds between two lines of a non-terminal progress report
_STOP: list[int] = []  # the signal numbers of stops requested and not yet taken


def request_stop(signum: int) -> None:
  """Asks every loop of :func:`progress_bar` to stop before its next item."""
  _STOP.append(signum)


def stop_requested() -> bool:
  return bool(_STOP)


def clear_stop() -> None:
  _STOP.clear()


def _stoppable(iterable: Iterable[Any]) -> Iterator[Any]:
  for item in iterable:
    if _STOP:
      raise KeyboardInterrupt
    yield item


class LineProgress:
  """The non-terminal stand-in for a tqdm bar: iterate, ``set_postfix``, ``close``."""

  def __init__(self, iterable: Iterable[Any], desc: str, total: int | None, initial: int,
               stream: TextIO, interval_s: float):
    self.iterable, self.desc, self.stream, self.interval_s = iterable, desc, stream, interval_s
    self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__")
                                                  else None)
    self.count, self.postfix = initial, ""
    self.start = self.last = time.perf_counter()
    self._pending = False

  def set_postfix(self, **values: Any) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def _write(self) -> None:
    of = f"/{self.total}" if self.total is not None else ""
    extra = f" {self.postfix}" if self.postfix else ""
    self.stream.write(f"{self.desc}: {self.count}{of}{extra} "
                      f"({time.perf_counter() - self.start:.0f} s)\n")
    self.stream.flush()
    self.last, self._pending = time.perf_counter(), False

  def __iter__(self) -> Iterator[Any]:
    for item in self.iterable:
      if self._pending and time.perf_counter() - self.last >= self.interval_s:
        self._write()  # the previous item's report, with the postfix set after it
      yield item
      self.count += 1
      self._pending = True
    self.close()

  def close(self) -> None:
    if self._pending:
      self._write()


def progress_bar(iterable: Iterable[Any], *, desc: str, disable: bool = False,
                 total: int | None = None, initial: int = 0, stream: TextIO | None = None,
                 interval_s: float = INTERVAL_S) -> Any:
  """A tqdm bar over ``iterable`` when ``stream`` (default stderr) is a terminal, else a
  :class:`LineProgress`; with ``disable``, a silent one. Both take ``set_postfix`` and ``close``,
  and raise ``KeyboardInterrupt`` before the next item once a stop is requested."""
  stream = sys.stderr if stream is None else stream
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  iterable = _stoppable(iterable)
  if not disable and not stream.isatty():
    return LineProgress(iterable, desc, total, initial, stream, interval_s)
  return tqdm(iterable, desc=desc, disable=disable, total=total, initial=initial, file=stream,
              dynamic_ncols=True)
