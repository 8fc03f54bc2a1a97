"""The package's import graph has no cycles and no upward import between its layers, counting
imports inside functions too (a cycle hidden in a function is still two modules that cannot be
understood or moved apart)."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

# The layers, lowest first: a module may import its own layer and those below (a name covers
# its submodules, the longest matching name decides; "$" ends a name that covers only itself).
# The commands are the top. A new module must be placed here.
LAYERS = (
    ("data", "agriclip_jax.errors", "agriclip_jax.files", "agriclip_jax.pytree"),
    ("agriclip_jax.config_lib", "agriclip_jax.sharding", "agriclip_jax.distributed",
     "agriclip_jax.workdir_lock", "agriclip_jax.metric_writer", "agriclip_jax.optim",
     "agriclip_jax.checkpointing", "agriclip_jax.results"),
    ("agriclip_jax.input",),
    ("agriclip_jax.losses", "agriclip_jax.models"),
    ("agriclip_jax.evaluators",),
    ("agriclip_jax.trainers", "agriclip_jax.runs", "agriclip_jax.inference"),
    ("agriclip_jax$", "agriclip_jax.launch", "agriclip_jax.predict", "agriclip_jax.embed",
     "agriclip_jax.export", "agriclip_jax.plan", "agriclip_jax.benchmarks"),
)


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


def layer_of(module: str) -> int | None:
  matches = [(len(name), i) for i, names in enumerate(LAYERS) for name in names
             if module == name.rstrip("$")
             or (not name.endswith("$") and module.startswith(name + "."))]
  return max(matches)[1] if matches else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  return [f"{m} -> {e}" for m, edges in sorted(graph.items()) for e in sorted(edges)
          if layer_of(e) > layer_of(m)]


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


def test_no_module_imports_a_higher_layer():
  graph = import_graph(modules(REPO, ("agriclip_jax", "data")))
  assert [m for m in graph if layer_of(m) is None] == []  # Every module has its layer...
  assert layer_of("agriclip_jax.new_module") is None  # ...which a new one must be given.
  assert upward_imports(graph) == []
  # The user-facing errors' base imports nothing: each layer defines its own error types.
  assert graph["agriclip_jax.errors"] == set()
  # An upward edge is found (the errors module once imported the training loop's errors).
  graph["agriclip_jax.errors"] = {"agriclip_jax.trainers.loop"}
  assert upward_imports(graph) == ["agriclip_jax.errors -> agriclip_jax.trainers.loop"]


def test_every_layers_user_errors_are_caught_by_the_commands():
  # pylint: disable=g-import-not-at-top
  from agriclip_jax import checkpointing, config_lib, errors, workdir_lock
  from agriclip_jax.input import datasets, preprocess
  from agriclip_jax.models.importers import common as importers
  from agriclip_jax.trainers import loop
  for error in (checkpointing.CheckpointMismatchError, checkpointing.CheckpointWriteError,
                config_lib.ConfigError, datasets.DatasetError, preprocess.CorruptImageError,
                loop.NonFiniteError, workdir_lock.WorkdirError, workdir_lock.WorkdirInUseError,
                importers.CheckpointImportError, FileNotFoundError):
    assert issubclass(error, errors.USER_ERRORS), error
  assert not issubclass(loop.Preempted, errors.USER_ERRORS)  # Exit 143, not an input error.
  assert issubclass(checkpointing.CheckpointWriteError, OSError)  # Their old bases stay.
