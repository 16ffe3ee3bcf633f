"""The notebooks execute as committed, on tiny settings (D3JAX_QUICK=1: one epoch or a few steps)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_built_by_the_build_script():
  import importlib.util
  spec = importlib.util.spec_from_file_location("build", NOTEBOOKS[0].with_name("build.py"))
  build = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(build)
  assert sorted(build.NOTEBOOKS) == sorted(p.name for p in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("D3JAX_QUICK", "1")
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}}).execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
  assert not errors
