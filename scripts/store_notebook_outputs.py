"""Copies executed notebooks' outputs into ``notebooks/*.ipynb``.

Usage: ``python scripts/store_notebook_outputs.py EXECUTED_DIR`` where
``EXECUTED_DIR`` holds the notebooks as the docs build executed them
(``docs/_build/jupyter_execute/_notebooks`` after ``bash scripts/docs.sh``).
Only the code cells' ``outputs`` and ``execution_count`` are replaced; the
sources stay as they are, and a notebook whose sources differ from the
executed one's (edited since the build) is refused, not overwritten.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _code_cells(notebook):
  return [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']


def _source(cell):
  source = cell['source']
  return ''.join(source) if isinstance(source, list) else source


def store(executed_dir: pathlib.Path) -> int:
  status = 0
  for path in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    executed_path = executed_dir / path.name
    if not executed_path.exists():
      print(f'error: {executed_path} missing: build the docs first',
            file=sys.stderr)
      status = 1
      continue
    stored = json.loads(path.read_text())
    executed = json.loads(executed_path.read_text())
    cells, new_cells = _code_cells(stored), _code_cells(executed)
    if [_source(c) for c in cells] != [_source(c) for c in new_cells]:
      print(f'error: {path.name} was edited after the build that executed '
            'it: build again', file=sys.stderr)
      status = 1
      continue
    for cell, new in zip(cells, new_cells):
      cell['outputs'] = new.get('outputs', [])
      cell['execution_count'] = new.get('execution_count')
    text = json.dumps(stored, indent=1, sort_keys=True,
                      ensure_ascii=False) + '\n'
    if text != path.read_text():
      path.write_text(text)
      print(f'notebooks/{path.name}: stored outputs updated')
  return status


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  sys.exit(store(pathlib.Path(sys.argv[1])))
