#!/usr/bin/env bash
# The main job, offline: the paper's fully connected network trained with
# plain SGD, BatchNorm, LayerNorm and BNP on scikit-learn's bundled digits
# (no download), at the paper's learning rates. Prints each epoch's loss and
# test accuracy and a summary table, and writes one JSON per run and a figure
# to results/main-job/. The runs go to a fresh directory that replaces
# results/main-job/ only when the job succeeds, so older runs never mix
# into the figure, and a failed or interrupted job keeps the previous one.
# Arguments are passed on, e.g. `bash scripts/main_job.sh --epochs 20`;
# the full harness: `python -m bnp_optax.experiments --help`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" experiments
out=results/main-job
new="results/.main-job.$$"
trap 'rm -rf "$new"' EXIT
status=0
echo "training into $new/ (it replaces $out/ when the job succeeds)"
python -m bnp_optax.experiments suite digits --out "$new" "$@" || status=$?
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
rm -rf "$out"
mv "$new" "$out"
echo
echo "The job trained into $new/ and moved it to $out/; the files are:"
find "$out" -type f \( -name '*.json' -o -name '*.png' \) | sort | sed 's/^/  /'
