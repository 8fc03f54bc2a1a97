"""The package's import graph has no cycles, counting imports inside functions too (a cycle
hidden in a function is still two modules that cannot be understood or moved apart)."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def modules(root: pathlib.Path, packages) -> dict[str, pathlib.Path]:
  out = {}
  for package in packages:
    for path in (root / package).rglob("*.py"):
      parts = path.relative_to(root).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def import_graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """module -> the modules of `mods` it imports anywhere in its file. `from pkg import sub`
  is an edge to pkg.sub alone: a package's own __init__ importing its submodules lazily is
  the package choosing an implementation, not a cycle."""
  graph = {}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in mods:
          target = target.rpartition(".")[0]
        if target and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  for start in graph:
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
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
          out.append(sorted(component))
  return out


def test_no_module_imports_itself_through_others():
  mods = modules(REPO, ("agriclip_jax", "data"))
  assert len(mods) > 80
  graph = import_graph(mods)
  assert "agriclip_jax.runs" in graph["agriclip_jax.trainers.align"]  # Edges are seen.
  assert cycles(graph) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text("from pkg import b\n")
  (package / "b.py").write_text("def f():\n  from pkg import c\n")
  (package / "c.py").write_text("import pkg.a\n")
  (package / "d.py").write_text("from pkg import a\n")
  found = cycles(import_graph(modules(tmp_path, ("pkg",))))
  assert found == [["pkg.a", "pkg.b", "pkg.c"]]
