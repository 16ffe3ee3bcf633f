"""The package surface: every subpackage is an attribute after ``import d3jax``, cheaply."""
import pkgutil
import subprocess
import sys

import pytest

import d3jax


def test_every_subpackage_reachable_after_import():
  subpackages = [m.name for m in pkgutil.iter_modules(d3jax.__path__) if m.ispkg]
  assert "analysis" in subpackages
  missing = [name for name in subpackages if not hasattr(d3jax, name)]
  assert not missing, f"not reachable after import d3jax: {missing}"
  assert callable(d3jax.analysis.path_curves)


@pytest.mark.slow  # a fresh interpreter: this process has imported everything already
def test_import_pulls_no_heavy_optional_modules():
  heavy = ("matplotlib", "torch", "tensorflow_datasets", "tensorflow")
  code = f"import sys, d3jax; print([m for m in {heavy!r} if m in sys.modules])"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
