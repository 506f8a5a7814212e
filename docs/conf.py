"""Sphinx configuration: autosummary + napoleon + myst-nb, as optax does.

The notebooks live in ``notebooks/`` at the repository root, with the
outputs of their last build stored (``bash scripts/docs.sh`` writes them back;
``tests/test_docs.py`` checks that they are current); they are copied into
``docs/_notebooks`` here and executed again by myst-nb during every build, so
the site cannot go stale. The build needs no network.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Executed code (notebooks and how-to pages) runs on the CPU, with 4 fake
# devices for the multi-device page; kernels inherit this environment.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''
):
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + ' --xla_force_host_platform_device_count=4'
  ).strip()
os.environ.setdefault('PYTHONWARNINGS', 'ignore::DeprecationWarning')


def _write_if_changed(path: pathlib.Path, content: bytes) -> None:
  """Leaves unchanged files alone, so concurrent builds do not race."""
  if not path.exists() or path.read_bytes() != content:
    path.write_bytes(content)


def _copy_notebooks() -> None:
  target = pathlib.Path(__file__).resolve().parent / '_notebooks'
  target.mkdir(exist_ok=True)
  sources = sorted((ROOT / 'notebooks').glob('*.ipynb'))
  names = {notebook.name for notebook in sources}
  for old in target.glob('*.ipynb'):
    if old.name not in names:
      old.unlink()
  for notebook in sources:
    _write_if_changed(target / notebook.name, notebook.read_bytes())


_copy_notebooks()

# The API reference lists every name in each public module's ``__all__``:
# ``api.md`` includes one generated list per module, so a new public name
# appears without editing the docs (tests/test_docs.py checks the pages).
API_MODULES = ('bnp_optax', 'bnp_optax.linen', 'bnp_optax.nnx',
               'bnp_optax.tracing', 'bnp_optax.diagnostics')


def _write_api_lists() -> None:
  import importlib  # pylint: disable=g-import-not-at-top

  target = pathlib.Path(__file__).resolve().parent
  for name in API_MODULES:
    module = importlib.import_module(name)
    lines = ['```{eval-rst}', f'.. currentmodule:: {name}', '',
             '.. autosummary::', '   :toctree: _autosummary', '']
    lines += [f'   {symbol}' for symbol in sorted(module.__all__,
                                                   key=str.lower)]
    lines += ['```', '']
    _write_if_changed(target / f'_api_{name}.md',
                      '\n'.join(lines).encode())


_write_api_lists()


def _remove_stale_stubs() -> None:
  """Stub pages of names no longer public go (they fail -W as orphans)."""
  import importlib  # pylint: disable=g-import-not-at-top

  current = {f'{name}.{symbol}.rst' for name in API_MODULES
             for symbol in importlib.import_module(name).__all__}
  stubs = pathlib.Path(__file__).resolve().parent / '_autosummary'
  for stub in stubs.glob('*.rst'):
    if stub.name not in current:
      stub.unlink()


_remove_stale_stubs()

project = 'bnp_optax'
author = 'bnp_optax authors'
copyright = '2026, bnp_optax authors'  # pylint: disable=redefined-builtin

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'myst_nb',
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', '_api_*.md', 'Thumbs.db', '.DS_Store',
                    '**.ipynb_checkpoints']
master_doc = 'index'

# The generated lists are included by api.md, not documents of their own:
# name them so that autosummary writes their stubs.
autosummary_generate = [f'_api_{name}.md' for name in API_MODULES]
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': True, 'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3

# Execute every notebook and code-cell page on every build. A cell that
# raises is reported as a warning carrying the cell's traceback (with
# `nb_execution_raise_on_error = True` myst-nb raises instead and the console
# shows only the notebook's path), and `-W` turns that warning into a failed
# build.
nb_execution_mode = 'force'
nb_execution_timeout = 600
nb_execution_raise_on_error = False
nb_execution_show_tb = True
nb_merge_streams = True

html_theme = 'sphinx_book_theme'
html_title = 'bnp_optax'
html_theme_options = {'show_toc_level': 2}
suppress_warnings = ['mystnb.unknown_mime_type']
templates_path = ['_templates']


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented in the class's Attributes section."""
  del app, what, name, options
  doc = getattr(obj, '__doc__', None) or ''
  if doc.startswith('Alias for field number'):
    return True
  return skip


def setup(app):
  app.connect('autodoc-skip-member', _skip_namedtuple_fields)
