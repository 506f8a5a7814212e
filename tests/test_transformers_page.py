"""The Transformer page (docs/transformers.md): tables match the runs."""

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'transformers.md'


def _build_module():
  spec = importlib.util.spec_from_file_location(
      'transformers_build', ROOT / 'docs' / 'transformers' / 'build.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tables_match_the_committed_runs():
  build = _build_module()
  page = PAGE.read_text()
  assert build.render(page, build.blocks()) == page, (
      'docs/transformers.md differs from its committed runs: run '
      'python docs/transformers/build.py')


def test_cpu_runs_are_committed_and_complete():
  build = _build_module()
  summary = build.summarize(build.load('cpu'))
  assert set(summary) == set(build.ORDER)
  for key, s in summary.items():
    assert len(s['rates']) == 3, key
    assert s['best'] is not None, key  # some rate trained


def test_page_code_runs():
  blocks = re.findall(r'```python\n(.*?)```', PAGE.read_text(), re.S)
  assert blocks
  for code in blocks:
    exec(compile(code, str(PAGE), 'exec'), {})  # pylint: disable=exec-used
