"""The package's imports flow one way (DESIGN.md 3): no cycles; only entry points import the trainer.

Every file under jaxembed/ is parsed with ``ast`` and every in-package import
is collected, at the top of a file or deferred inside a function alike (a
deferred import hides a cycle, it does not remove it). ``from pkg import
name`` counts as importing the module ``pkg.name`` when that is a file, else
``pkg`` itself; a package's ``__init__`` counts as its own module.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxembed"

# The training entry points: the command line (train.py, and the cli that
# dispatches to it) and the estimator. Nothing else may import the trainer.
TRAINER = "jaxembed.trainer"
ENTRY_POINTS = {"jaxembed.train", "jaxembed.api", "jaxembed.cli"}


def module_files(root):
  """{dotted module name: path} of every .py file under ``root`` (a package directory)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def import_graph(root):
  """{module: {imported in-package modules}} over ``root``, deferred imports included."""
  modules = module_files(root)
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                   for alias in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph):
  """One import cycle as a list of modules (first == last), or None."""
  state = {}  # module -> "visiting" | "done"
  stack = []

  def visit(node):
    state[node] = "visiting"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "visiting":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph(PACKAGE))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_entry_points_import_the_trainer():
  graph = import_graph(PACKAGE)
  assert TRAINER in graph
  importers = sorted(m for m, edges in graph.items() if TRAINER in edges)
  assert set(importers) <= ENTRY_POINTS, (
      f"{sorted(set(importers) - ENTRY_POINTS)} import {TRAINER}; only the entry points "
      f"{sorted(ENTRY_POINTS)} may (use jaxembed.runs to load a trained run)")


def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files,cycle", [
    # Top-level imports in a cycle of three.
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "import pkg.c\n",
      "pkg/c.py": "from pkg.a import thing\n"}, ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
    # A deferred import closes the cycle.
    ({"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "def f():\n  from pkg import a\n  return a\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
    # A relative import in a subpackage, and a name from a package's __init__.
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from pkg.sub.x import X\n",
      "pkg/sub/x.py": "from . import y\nX = 1\n", "pkg/sub/y.py": "from pkg.sub import X\n"},
     ["pkg.sub", "pkg.sub.x", "pkg.sub.y", "pkg.sub"]),
    # No cycle: siblings imported through their package, one way.
    ({"pkg/__init__.py": "from pkg import a\n", "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "import os\n"}, None),
])
def test_the_checker_finds_cycles(tmp_path, files, cycle):
  _write(tmp_path, files)
  assert find_cycle(import_graph(tmp_path / "pkg")) == cycle
