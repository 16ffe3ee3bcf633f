"""JAX's persistent compilation cache for the command line and long-lived sessions.

Compiled programs are written to a cache directory and read back by later processes, so a
second ``d3jax`` invocation with the same program and shapes skips XLA's compilation.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "D3JAX_CACHE_DIR"


def default_dir() -> Path:
  """``$D3JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/d3jax/jax``, else ``~/.cache/d3jax/jax``."""
  if os.environ.get(ENV_VAR):
    return Path(os.environ[ENV_VAR])
  base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  return base / "d3jax" / "jax"


def enable(path: str | os.PathLike | None = None, min_compile_time_s: float = 0.5) -> Path:
  """Turns the persistent cache on in ``path`` (default :func:`default_dir`) for programs whose
  compilation took at least ``min_compile_time_s``; returns the directory."""
  directory = Path(path) if path is not None else default_dir()
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
