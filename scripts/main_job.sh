#!/usr/bin/env bash
# The main job, offline: the paper's fully connected network trained with
# plain SGD, BatchNorm, LayerNorm and BNP on scikit-learn's bundled digits
# (no download), at the paper's learning rates. Prints each epoch's loss and
# test accuracy and a summary table, and writes one JSON per run and a figure
# to results/main-job/ (replaced at each run of this script).
# Arguments are passed on, e.g. `bash scripts/main_job.sh --epochs 20`;
# the full harness: `python -m bnp_optax.experiments --help`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" experiments
exec python -m bnp_optax.experiments suite digits --out results/main-job \
  --overwrite "$@"
