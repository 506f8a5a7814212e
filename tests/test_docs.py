"""The documentation: builds with warnings as errors, executes every notebook.

Notebook policy: the notebooks in ``notebooks/`` are stored *with the
outputs* of their last execution, so that GitHub and Jupyter show results
without a build; the docs build (myst-nb, ``nb_execution_mode = 'force'``)
executes them again every time, and the build test below checks that the
stored outputs are those of the current code (same text, numbers within
rounding). ``bash scripts/docs.sh`` builds the site and stores the new
outputs.
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


def _code_cells(path):
  notebook = json.loads(pathlib.Path(path).read_text())
  return [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']


def test_notebooks_are_stored_executed():
  """Every code cell ran, in order, in one kernel; outputs are stored."""
  assert NOTEBOOKS, 'no notebooks found'
  for path in NOTEBOOKS:
    cells = _code_cells(path)
    counts = [cell.get('execution_count') for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f'{path.name}: not stored as executed ({counts}); run '
        '`bash scripts/docs.sh`')
    assert any(cell['outputs'] for cell in cells), path.name
    for cell in cells:
      for output in cell['outputs']:
        assert output['output_type'] != 'error', path.name


_NUMBER = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')


def _output_summary(cell):
  """A cell's outputs: their text with numbers taken out, and the numbers."""
  texts, kinds = [], []
  for output in cell['outputs']:
    kind = output['output_type']
    if kind == 'stream':
      texts.append(''.join(output['text']))
      kinds.append('stream')
    else:
      data = output.get('data', {})
      kinds.append(kind + ':' + ','.join(sorted(
          mime for mime in data if mime in ('image/png', 'text/plain'))))
      if 'image/png' not in data:
        texts.append(''.join(data.get('text/plain', '')))
  text = '\n'.join(texts)
  # Streams may arrive in several outputs or one (nb_merge_streams).
  kinds = [k for i, k in enumerate(kinds)
           if k != 'stream' or i == 0 or kinds[i - 1] != 'stream']
  numbers = [float(n) for n in _NUMBER.findall(text)]
  return kinds, _NUMBER.sub('#', text), numbers


def _check_outputs_current(stored_path, executed_path):
  stored, executed = _code_cells(stored_path), _code_cells(executed_path)
  name = stored_path.name
  assert len(stored) == len(executed), name
  for i, (old, new) in enumerate(zip(stored, executed)):
    old_kinds, old_text, old_numbers = _output_summary(old)
    new_kinds, new_text, new_numbers = _output_summary(new)
    where = (f'{name}, code cell {i + 1}: stored outputs are not the '
             'current ones; run `bash scripts/docs.sh`')
    assert old_kinds == new_kinds, (where, old_kinds, new_kinds)
    assert old_text == new_text, (where, old_text, new_text)
    # Within rounding of the printed digits: another CPU's XLA may round
    # the last digit differently, a code change moves more than that.
    assert numbers_close(old_numbers, new_numbers), (
        where, old_numbers, new_numbers)


def numbers_close(old, new, rtol=0.05, atol=0.01):
  return len(old) == len(new) and all(
      abs(a - b) <= atol + rtol * max(abs(a), abs(b)) for a, b in zip(old,
                                                                      new))


def test_stored_output_check_catches_a_changed_number(tmp_path):
  path = NOTEBOOKS[0]
  notebook = json.loads(path.read_text())
  for cell in notebook['cells']:
    for output in cell.get('outputs', []):
      if output['output_type'] == 'stream':
        output['text'] = [re.sub(r'\d\.\d+', '0.123456', ''.join(
            output['text']))]
  changed = tmp_path / path.name
  changed.write_text(json.dumps(notebook))
  assert changed.read_text() != json.dumps(json.loads(path.read_text())), (
      f'{path.name} prints no number to change')
  _check_outputs_current(path, path)
  with pytest.raises(AssertionError, match='not the current ones'):
    _check_outputs_current(changed, path)


# The distribution that provides each module the docs import.
_DISTRIBUTIONS = {
    'bnp_optax': 'bnp_optax', 'equinox': 'equinox', 'haiku': 'dm-haiku',
    'flax': 'flax', 'jax': 'jax', 'optax': 'optax', 'numpy': 'numpy',
    'matplotlib': 'matplotlib', 'sklearn': 'scikit-learn',
    'orbax': 'orbax-checkpoint', 'chex': 'chex',
}


def test_docs_extra_installs_what_the_docs_import():
  """`pip install '.[docs]'` alone builds the docs: no import is missing."""
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
  installed = {re.match(r'[A-Za-z0-9_.-]+', r).group(0).lower()
               for r in (project['dependencies']
                         + project['optional-dependencies']['docs'])}
  installed.add('bnp_optax')
  sources = [''.join(cell['source']) for path in NOTEBOOKS
             for cell in _code_cells(path)]
  for page in sorted(DOCS.rglob('*.md')):
    if '_build' not in page.parts:
      sources += re.findall(r'^```\{code-cell\}.*?\n(.*?)^```',
                            page.read_text(), re.S | re.M)
  modules = set()
  for source in sources:
    modules |= set(re.findall(r'^\s*(?:import|from) ([A-Za-z_]\w*)', source,
                              re.M))
  for module in sorted(modules - set(sys.stdlib_module_names)):
    assert module in _DISTRIBUTIONS, f'add {module} to _DISTRIBUTIONS'
    assert _DISTRIBUTIONS[module].lower() in installed, (
        f'the docs import {module}: add {_DISTRIBUTIONS[module]} to the '
        'docs extra in pyproject.toml')
  assert 'nbconvert' in installed, (
      'the docs tell readers to run notebooks with jupyter nbconvert')


def test_readme_lists_every_notebook():
  readme = (ROOT / 'README.md').read_text()
  for path in NOTEBOOKS:
    assert f'`{path.name}`' in readme, path.name


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
    # The stored outputs are this build's (myst-nb keeps the executed
    # notebooks beside the output directory).
    _check_outputs_current(
        path, tmp_path / 'jupyter_execute' / '_notebooks' / path.name)
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


def test_a_failing_cell_prints_its_own_error(tmp_path):
  """With the site's execution settings, -W fails and shows the cell's error.

  (myst-nb's `nb_execution_raise_on_error = True` fails with only the
  notebook's path on the console.)
  """
  settings = re.findall(r'^nb_execution_\w+ = .+$',
                        (DOCS / 'conf.py').read_text(), re.M)
  assert settings
  source = tmp_path / 'src'
  source.mkdir()
  (source / 'conf.py').write_text(
      "extensions = ['myst_nb']\n" + '\n'.join(settings) + '\n')
  (source / 'index.md').write_text(
      '---\nfile_format: mystnb\nkernelspec:\n  name: python3\n'
      '  display_name: Python 3\n---\n\n# Page\n\n'
      '```{code-cell}\nraise ValueError("the cell\'s own message")\n```\n')
  result = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b',
       'html', str(source), str(tmp_path / 'html')],
      capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert result.returncode != 0
  output = re.sub(r'\x1b\[[0-9;]*m', '', result.stdout + result.stderr)
  assert "ValueError: the cell's own message" in output, output[-3000:]


def test_readme_gives_the_docs_command():
  readme = (ROOT / 'README.md').read_text()
  assert 'bash scripts/docs.sh' in readme
  script = (ROOT / 'scripts' / 'docs.sh').read_text()
  assert 'sphinx -W' in script and 'store_notebook_outputs.py' in script
