#!/usr/bin/env bash
# The test suite: unit tests, the NumPy oracle, doctests. Arguments are passed
# on to pytest, e.g. `bash scripts/test.sh -k oracle`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec python -m pytest -n 2 "$@"
