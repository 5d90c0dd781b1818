"""The package's import structure: no import circles between flowjax modules, and evaluation
that does not reach into the trainer."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "flowjax")


def modules() -> dict:
  """{dotted module name: source path} of every flowjax module."""
  found = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  return found


def import_graph(top_level_only: bool) -> dict:
  """{module: the flowjax modules it imports}; an import of a.b.c also runs packages a.b and a.
  top_level_only: only the imports that run when the module is imported (not those inside
  functions)."""
  mods = modules()

  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for module, path in mods.items():
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    deps = set()
    for node in nodes:
      if isinstance(node, ast.Import):
        deps.update(resolve(alias.name) for alias in node.names
                    if alias.name.startswith("flowjax"))
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flowjax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in mods else resolve(node.module))
    for dep in list(deps):
      parts = dep.split(".")
      deps.update(".".join(parts[:i]) for i in range(2, len(parts)))
    graph[module] = {dep for dep in deps
                     if dep and dep != module and not module.startswith(dep + ".")}
  return graph


def cycles(graph: dict) -> list:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_circles_at_module_level():
  assert cycles(import_graph(top_level_only=True)) == []


def test_evaluation_does_not_import_the_trainer():
  """flowjax.evals and its modules reach trained models through evals.Evaluable only."""
  graph = import_graph(top_level_only=False)
  for module, deps in graph.items():
    if module == "flowjax.evals" or module.startswith("flowjax.evals."):
      assert not deps & {"flowjax.train", "flowjax.modes", "flowjax.api", "flowjax.main"}, (
          module, deps)
  assert not any("flowjax.evals" in component and "flowjax.train" in component
                 for component in cycles(graph))


def test_the_cycle_finder_finds_a_planted_circle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
