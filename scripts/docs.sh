#!/usr/bin/env bash
# The documentation site, offline: `sphinx-build -W` (warnings, and so any
# error in a notebook or how-to page, fail the build, with the cell's
# traceback on the console) into docs/_build/html/, executing every notebook
# and every how-to page. Then copies the executed notebooks' outputs back
# into notebooks/*.ipynb (sources untouched), so that the stored outputs, which
# GitHub and Jupyter show without a build, are those of the current code
# (tests/test_docs.py checks that they are). Arguments are passed on to
# sphinx-build, e.g. `bash scripts/docs.sh -j 2`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" docs
python -m sphinx -W --keep-going -b html -d docs/_build/doctrees "$@" \
  docs docs/_build/html
python scripts/store_notebook_outputs.py docs/_build/jupyter_execute/_notebooks
echo "site: docs/_build/html/index.html"
