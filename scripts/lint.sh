#!/usr/bin/env bash
# Lint: `ruff check` with the configuration in pyproject.toml. Arguments are
# passed on to ruff, e.g. `bash scripts/lint.sh --fix`. The version is pinned
# so that a new ruff release does not change what CI reports.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
if [ "$(ruff --version 2>/dev/null)" != "ruff 0.17.5" ]; then
  python -m pip install --quiet 'ruff==0.17.5'
fi
exec ruff check "$@" .
