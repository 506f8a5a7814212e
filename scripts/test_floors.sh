#!/usr/bin/env bash
# The declared minimum versions, for real: installs exactly the floors that
# pyproject.toml declares (every `>=` of the dependencies and of the
# `checkpoint` extra, read from pyproject.toml itself, pinned with `==`) into
# a fresh virtual environment, .venv-floors, and runs the smoke tests
# (tests/test_smoke.py: linen and NNX training steps, checkpoints).
# CI runs it after the full suite; arguments are passed on to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv-floors
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
python - > "$venv/floors.txt" <<'PY'
import re, tomllib
project = tomllib.load(open('pyproject.toml', 'rb'))['project']
for requirement in (project['dependencies']
                    + project['optional-dependencies']['checkpoint']):
  name, floor = re.fullmatch(r'([A-Za-z0-9_.-]+)>=([0-9.]+)',
                             requirement).groups()
  print(f'{name}=={floor}')
PY
echo "floors: $(tr '\n' ' ' < "$venv/floors.txt")"
python -m pip install --quiet -r "$venv/floors.txt" -e . pytest
python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|optax|flax|chex|numpy|orbax-checkpoint) '
exec python -m pytest -p no:cacheprovider -q -o addopts='' \
  tests/test_smoke.py "$@"
