"""The documentation: builds with warnings as errors, executes every notebook.

Notebook policy: the notebooks in ``notebooks/`` are stored *without
outputs*; the docs build (myst-nb, ``nb_execution_mode = 'force'``) executes
them every time, so what the site shows is always current and the
repository holds no stale outputs.
"""

import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
API_MODULES = ('bnp_optax', 'bnp_optax.linen', 'bnp_optax.nnx',
               'bnp_optax.tracing', 'bnp_optax.diagnostics')

pytest.importorskip('sphinx')
pytest.importorskip('myst_nb')


def _public_names():
  for module_name in API_MODULES:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      yield module_name, name


def test_notebooks_are_stored_without_outputs():
  assert NOTEBOOKS, 'no notebooks found'
  for path in NOTEBOOKS:
    notebook = json.loads(path.read_text())
    for cell in notebook['cells']:
      if cell['cell_type'] == 'code':
        assert not cell.get('outputs'), f'{path.name} has outputs'
        assert cell.get('execution_count') is None, path.name


def test_notebooks_and_pages_use_the_public_api_only():
  sources = NOTEBOOKS + sorted(DOCS.rglob('*.md'))
  for path in sources:
    if '_generated' in path.parts or '_build' in path.parts:
      continue
    text = path.read_text()
    assert '_src' not in text, f'{path} uses a private module'
    assert '../shared' not in text and '/work/' not in text, path


def test_every_notebook_is_in_a_toctree():
  index = (DOCS / 'index.md').read_text()
  for path in NOTEBOOKS:
    assert f'_notebooks/{path.stem}' in index, path.name


def test_docs_build_with_warnings_as_errors(tmp_path):
  """sphinx-build -W: notebooks and how-to pages executed, API complete."""
  out = tmp_path / 'html'
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
       'html', '-d', str(tmp_path / 'doctrees'), str(DOCS), str(out)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  for page in ['index', 'installation', 'theory', 'api']:
    assert (out / f'{page}.html').exists(), page
  for path in NOTEBOOKS:
    html = (out / '_notebooks' / f'{path.stem}.html').read_text()
    # Executed: the figures are in the page.
    assert 'data:image/png' in html or '.png' in html, path.name
  api = (out / 'api.html').read_text()
  missing = []
  for module_name, name in _public_names():
    page = out / '_autosummary' / f'{module_name}.{name}.html'
    if not page.exists() or f'{module_name}.{name}' not in api:
      missing.append(f'{module_name}.{name}')
      continue
    # The page carries the docstring (not just a heading).
    text = re.sub(r'<[^>]+>', ' ', page.read_text())
    obj = getattr(importlib.import_module(module_name), name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
      doc = inspect.getdoc(obj) or ''
      assert doc, f'{module_name}.{name} has no docstring'
      words = re.findall(r'[A-Za-z]{4,}', doc.splitlines()[0])
      assert any(w in text for w in words), (module_name, name)
  assert not missing, f'public names without an API page: {missing}'
