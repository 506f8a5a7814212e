"""README.md's Python blocks run as written, in order, in a fresh interpreter.

A newcomer pastes them one after another; so does this test (one process,
one namespace), and it checks that what they print is what README says.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'


def _python_blocks(text):
  return re.findall(r'^```python\n(.*?)^```', text, re.S | re.M)


def test_readme_has_python_blocks():
  assert len(_python_blocks(README.read_text())) >= 2


def test_readme_python_blocks_run_in_order(tmp_path):
  script = '\n\n'.join(_python_blocks(README.read_text()))
  path = tmp_path / 'readme.py'
  path.write_text(script)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [sys.executable, str(path)], capture_output=True, text=True,
      cwd=tmp_path, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [float(v) for v in re.findall(r'loss after 100 steps: ([0-9.]+)',
                                         result.stdout)]
  assert len(losses) == 3 and all(loss < 0.5 for loss in losses), (
      result.stdout)
