#!/usr/bin/env bash
# Lint: `ruff check` with the configuration in pyproject.toml. Arguments are
# passed on to ruff, e.g. `bash scripts/lint.sh --fix`. The test extra pins
# ruff, so that a new release does not change what CI reports.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec ruff check "$@" .
