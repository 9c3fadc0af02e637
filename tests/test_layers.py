"""The package's shape: no import loops, nothing imports upward, the numpy-only parts import no
JAX, and no module grows past 500 lines. Imports inside functions count too."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "lsdist_jax")

# A module may import only modules of a lower level, or of its own package (folder).
LEVELS = {
    "lsdist_jax.errors": 0, "lsdist_jax.config": 0,
    "lsdist_jax.files": 1, "lsdist_jax.paths": 1, "lsdist_jax.shapes": 1, "lsdist_jax.logs": 1,
    "lsdist_jax.cli": 1, "lsdist_jax.processes": 1,
    "lsdist_jax.exports": 2, "lsdist_jax.sharding": 2, "lsdist_jax.data": 2,
    "lsdist_jax.llama": 3, "lsdist_jax.schedule": 3, "lsdist_jax.store": 3,
    "lsdist_jax.engine": 4, "lsdist_jax.predictor": 4, "lsdist_jax.report": 4,
    "lsdist_jax.collect_rows": 4,
    "lsdist_jax.collect": 5, "lsdist_jax.lora": 5,
    "lsdist_jax.serve": 6,
    "lsdist_jax.benchmark": 7,
    "lsdist_jax.pipeline": 8,
    "lsdist_jax": 9,  # the package's __init__ (lazy `Engine`)
}


def modules():
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def imports_of(path, module, known):
  """Modules that `module` imports: `from X import a` counts X.a where that is a module, else X."""
  tree = ast.parse(open(path).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.rsplit(".", node.level)[0]
        target = f"{base}.{node.module}" if node.module else base
      else:
        target = node.module
      for alias in node.names:
        found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
  return found


def graph():
  mods = modules()
  edges = {}
  for module, path in mods.items():
    targets = set()
    for name in imports_of(path, module, mods):
      while name and name not in mods:
        name = name.rpartition(".")[0]
      if name and name != module and name.startswith("lsdist_jax"):
        targets.add(name)
    edges[module] = targets
  return edges


def level(module):
  name = module
  while name not in LEVELS:
    name = name.rpartition(".")[0]
  return LEVELS[name], name


def test_every_module_has_a_level():
  for module in modules():
    level(module)


def test_nothing_imports_upward():
  bad = []
  for module, targets in graph().items():
    (own, group) = level(module)
    for target in targets:
      their, their_group = level(target)
      if their_group != group and their >= own and not (group == "lsdist_jax"):
        bad.append(f"{module} -> {target}")
  assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_loops():
  edges = graph()
  state, loops = {}, []

  def visit(node, stack):
    state[node] = 1
    for nxt in edges.get(node, ()):
      if state.get(nxt) == 1:
        loops.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in edges:
    if node not in state:
      visit(node, [node])
  assert not loops, "import loops: " + "; ".join(" -> ".join(l) for l in loops)


def test_the_runner_and_the_application_reach_no_llama_internals():
  edges = graph()
  assert not [t for t in edges["lsdist_jax.serve.runner"] if t.startswith("lsdist_jax.llama")]
  for module, targets in edges.items():
    if module.startswith("lsdist_jax.llama"):
      assert all(t.startswith("lsdist_jax.llama") or level(t)[0] <= 2 for t in targets), module
  for module in ("lsdist_jax.predictor.losses", "lsdist_jax.predictor.metrics",
                 "lsdist_jax.predictor.calibration", "lsdist_jax.predictor.nets"):
    assert "lsdist_jax.store" not in edges[module], module  # maths lives in schedule/dist.py


def test_nothing_below_the_top_imports_the_benchmark():
  for module, targets in graph().items():
    if not module.startswith(("lsdist_jax.benchmark", "lsdist_jax.pipeline")):
      assert not [t for t in targets if t.startswith("lsdist_jax.benchmark")], module


@pytest.mark.parametrize("module", ["lsdist_jax.schedule", "lsdist_jax.benchmark.simulate",
                                    "lsdist_jax.serve.plan", "lsdist_jax.shapes"])
def test_numpy_only_modules_load_without_jax(module):
  code = f"import sys, {module}; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "False"


def test_no_module_over_500_lines():
  long = {m: n for m, p in modules().items() if (n := len(open(p).read().splitlines())) > 500}
  assert not long, long


def test_the_readme_layout_names_every_module():
  readme = open(os.path.join(REPO, "README.md")).read()
  layout = readme[readme.index("## Layout"):]
  layout = layout[:layout.index("\n## ", 5)] if "\n## " in layout[5:] else layout
  missing = []
  for module, path in modules().items():
    name = os.path.basename(path)
    if name == "__init__.py":
      continue
    folder = os.path.relpath(os.path.dirname(path), REPO)
    if name not in layout or f"{folder}/" not in layout + " lsdist_jax/":
      missing.append(module)
  assert not missing, f"README's layout table does not name {missing}"
