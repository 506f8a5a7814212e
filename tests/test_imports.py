"""Who imports whom in bnp_optax/_src, and what `import bnp_optax` loads.

The Flax integrations are the modules named ``linen_*`` and ``nnx_*``; they
may import the framework-free modules but not each other's framework, and no
other module may import Flax, directly or through a sibling.
"""

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / 'bnp_optax' / '_src'


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      if node.module == 'bnp_optax._src':
        names.update(f'bnp_optax._src.{a.name}' for a in node.names)
  return names


def _graph() -> dict[str, set[str]]:
  return {path.stem: _imports(path) for path in SRC.glob('*.py')}


def _siblings(imports: set[str]) -> set[str]:
  prefix = 'bnp_optax._src.'
  return {name[len(prefix):].split('.')[0] for name in imports
          if name.startswith(prefix)}


def _framework(module: str) -> str | None:
  for framework in ('linen', 'nnx'):
    if module.startswith(framework + '_'):
      return framework
  return None


def test_only_the_integrations_import_flax_and_never_each_other():
  graph = _graph()
  assert {'capture', 'linen_capture', 'nnx_capture', 'conditioning',
          'linen_hessian'} <= set(graph)
  for module, imports in graph.items():
    framework = _framework(module)
    for sibling in _siblings(imports):
      other = _framework(sibling)
      assert other in (None, framework), (module, sibling)
    if framework is None:
      assert not any(name.split('.')[0] == 'flax' for name in imports), module
      # ... nor through a sibling.
      assert all(_framework(s) is None for s in _siblings(imports)), module


def test_tracing_analysis_stands_apart_from_evaluation():
  """The jaxpr analysis knows layouts, not statistics or the interpreter."""
  graph = _graph()
  assert _siblings(graph['tracing_analysis']) == {'layout'}
  assert 'tracing_analysis' in _siblings(graph['tracing'])


def test_every_import_in_src_points_down():
  """No cycles: the modules of _src can be ordered, each importing earlier."""
  graph = {m: _siblings(i) for m, i in _graph().items()}
  ordered: list[str] = []
  while len(ordered) < len(graph):
    ready = sorted(m for m in graph if m not in ordered
                   and graph[m] <= set(ordered))
    assert ready, {m: graph[m] - set(ordered) for m in graph
                   if m not in ordered}
    ordered += ready


def test_import_bnp_optax_and_diagnostics_load_no_flax():
  code = (
      'import sys, bnp_optax, bnp_optax.diagnostics\n'
      "assert 'flax' not in sys.modules, sorted(m for m in sys.modules "
      "if 'flax' in m)\n"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr
