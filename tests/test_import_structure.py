"""Imports point one way: the d3jax import graph, read from the source with ``ast``, has no cycle,
and no defense imports a model module (a defense asks the model, e.g. NAD its
``attention_layers``). See docs/architecture.md."""
from __future__ import annotations

import ast
from pathlib import Path

import d3jax

PACKAGE = "d3jax"
ROOT = Path(d3jax.__file__).resolve().parent


def module_files() -> dict[str, Path]:
  """Every module of the package by dotted name (a package by its own name, for ``__init__``)."""
  modules = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def imported_names(module: str, path: Path, modules: set[str]) -> set[str]:
  """Dotted names ``module`` imports anywhere in its source (in functions too), relative imports
  resolved: ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` when that is one of
  ``modules`` (a submodule), else ``a`` (b is a name defined in ``a``)."""
  is_package = path.name == "__init__.py"
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        anchor = module.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        names.add(submodule if submodule in modules else base)
  return names


def is_ancestor(package: str, module: str) -> bool:
  return module.startswith(package + ".")


def import_graph() -> dict[str, set[str]]:
  """Edges module → d3jax module it imports. Importing ``a.b.c`` also imports ``a`` and ``a.b``;
  that implicit edge to a package is left out when the package contains the importer (a package's
  ``__init__`` importing its own submodules is no cycle)."""
  modules = module_files()
  graph: dict[str, set[str]] = {}
  for module, path in modules.items():
    targets = set()
    for name in imported_names(module, path, set(modules)):
      parts = name.split(".")
      for depth in range(1, len(parts) + 1):
        target = ".".join(parts[:depth])
        implicit = depth < len(parts)
        if target not in modules or target == module:
          continue
        if implicit and is_ancestor(target, module):
          continue
        targets.add(target)
    graph[module] = targets
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, successors = work[-1]
      child = next(successors, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))
  return components


def test_cycles_finds_a_cycle_and_ignores_a_chain():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_relative_imports_and_implicit_parents_resolve(tmp_path):
  source = tmp_path / "__init__.py"
  source.write_text("from . import x, name\nfrom .y import z\nimport d3jax.data.splits\n"
                    "def f():\n  from ..train import fit\n")
  modules = {"d3jax.pkg.x", "d3jax.pkg.y.z"}
  assert imported_names("d3jax.pkg", source, modules) == {
      "d3jax.pkg", "d3jax.pkg.x", "d3jax.pkg.y.z", "d3jax.data.splits", "d3jax.train"}


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert "d3jax.defenses" in graph and "d3jax.workflows.auto_choice" in graph
  found = cycles(graph)
  assert not found, "import cycles (each line one strongly connected component):\n" + "\n".join(
      " ↔ ".join(component) for component in found)


# The layers of docs/architecture.md: a unit (a top-level module or subpackage) imports only units
# of its own rank or below.
RANKS = {"d3jax.data": 0, "d3jax.models": 0, "d3jax.reductions": 0, "d3jax.metrics": 0,
         "d3jax.progress": 0, "d3jax.optim": 1, "d3jax.engine": 2, "d3jax.attacks": 3,
         "d3jax.defenses": 3, "d3jax.interop": 3, "d3jax.workflows": 4, "d3jax.rundirs": 5,
         "d3jax.analysis": 6, "d3jax.studies": 7, "d3jax": 8, "d3jax.cli": 9, "d3jax.__main__": 10}


def unit(module: str) -> str:
  return ".".join(module.split(".")[:2])


def test_every_unit_has_a_layer_and_imports_point_down():
  graph = import_graph()
  assert {unit(m) for m in graph} == set(RANKS), "a unit without a layer in RANKS (and the docs)"
  upward = [f"{a} → {b}" for a, targets in graph.items() for b in targets
            if RANKS[unit(b)] > RANKS[unit(a)]]
  assert not upward, "imports pointing up a layer:\n" + "\n".join(sorted(upward))


def test_no_defense_imports_a_model_module():
  graph = import_graph()
  def within(package: str, module: str) -> bool:
    return module == package or is_ancestor(package, module)
  offenders = {module: sorted(t for t in targets if within("d3jax.models", t))
               for module, targets in graph.items() if within("d3jax.defenses", module)}
  offenders = {module: targets for module, targets in offenders.items() if targets}
  assert not offenders, f"defense modules that import d3jax.models: {offenders}"
