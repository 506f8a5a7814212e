#!/usr/bin/env bash
# The main job: trains the paper's fully connected network with SGD and with
# BNP on scikit-learn's bundled digits (offline) and prints loss and accuracy.
# Arguments are passed on, e.g. `bash scripts/run_example.sh --epochs 20`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" examples
exec python -m bnp_optax.examples.digits "$@"
