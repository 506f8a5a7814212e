#!/usr/bin/env bash
# The comparison page's CIFAR-10 workloads (CNN at batch 2 and 128,
# ResNet-20 at batch 8 and 128) on one GPU machine, from the repository root:
#
#   bash docs/comparison/gpu.sh [DATA_DIR]      # DATA_DIR default: gpu_data
#
# One process per (workload, method), 31 of them, JOBS (default 32) at a
# time, each holding at most MEM_FRACTION (default 0.025) of the GPU: a
# learning-rate sweep of 3 rates (the middle three of
# docs/comparison/run.py's five) with seed 0, then
# a second seed at the chosen rate (2 seeds: cut from 3 to fit the time),
# at each workload's compute budget. Run JSON goes to
# docs/comparison/runs/<suite>/ and, when $OUT is set, is copied with the
# logs to $OUT/runs/<suite>/ and $OUT/logs/. Every process stops when
# TOTAL seconds (default 270) have passed since the start, so the command
# ends within about TOTAL + 15 s; finished runs are kept, and running the
# command again continues where it stopped (--skip-existing).
# QUICK=1: a dry run with tiny budgets and subsets (for a CPU), into
# results/gpu_dry/ instead.
set -u
DATA=${1:-gpu_data}
JOBS=${JOBS:-32}
TOTAL=${TOTAL:-270}
PY=${PY:-python3}
# 31 processes: each may grow to 2.5% of the GPU's memory (about 3.5 GB;
# ResNet-20 at batch 128 needs well under 1 GB) and none preallocates.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.025}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=.
RUNS=docs/comparison/runs
EXTRA="--checkpoint never"
if [ "${QUICK:-0}" = 1 ]; then
  RUNS=results/gpu_dry
  EXTRA="$EXTRA --budget 6 --train-subset 300 --test-subset 40"
fi
LOGS=${OUT:-results}/logs
mkdir -p "$LOGS" "$RUNS"
# Longest first: ResNet-20 at batch 8, the CNN at batch 2, then batch 128.
SUITES=${SUITES:-"cmp-resnet20-bs8 cmp-cnn-bs2 cmp-resnet20-bs128 cmp-cnn-bs128"}
JOBLIST=$($PY - "$SUITES" "${METHODS:-}" <<'EOF'
import sys
from bnp_optax.experiments import SUITES
only = [m for m in sys.argv[2].split(',') if m]
for suite in sys.argv[1].split():
  for m in SUITES[suite].methods:
    if not only or m in only:
      print(suite, m)
EOF
)
start=$(date +%s)
echo "$JOBLIST" | xargs -P "$JOBS" -L 1 bash -c '
  left=$(( '"$start"' + '"$TOTAL"' - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "$0 $1: no time left"; exit 0; fi
  timeout -k 10 "$left" '"$PY"' docs/comparison/run.py "$0" --methods "$1" \
    --rates 3 --seeds 2 --out '"$RUNS"' --data-dir '"$DATA"' '"$EXTRA"' \
    > '"$LOGS"'/"$0"-"$1".log 2>&1
  echo "$0 $1: exit $? after $(( $(date +%s) - '"$start"' ))s"'
echo "all done after $(( $(date +%s) - start ))s"
for s in $SUITES; do
  echo "$s: $(ls "$RUNS/$s"/*.json 2>/dev/null | wc -l) JSON files"
done
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/runs"
  for s in $SUITES; do
    [ -d "$RUNS/$s" ] && cp -r "$RUNS/$s" "$OUT/runs/"
  done
fi
exit 0
