#!/usr/bin/env bash
# The test suite: unit tests, the NumPy oracle, doctests. Arguments are passed
# on to pytest, e.g. `bash scripts/test.sh -k oracle`. Progress shows as a
# count of finished tests ([ 123/1000]) at the end of each line of dots; the
# ten slowest tests are listed at the end (the docs build, which executes
# every notebook, is the longest: minutes with no dot of its own).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec python -m pytest -n 2 -o console_output_style=count --durations=10 "$@"
