#!/bin/bash
# One GPU check for the reproduction report and the benchmarks, in one call
# of under 8 minutes on a GPU machine (prepared and tried on CPU with
# QUICK=1, which shrinks every part so that it only proves the script runs).
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu_check.sh  # dry run on a CPU
#
# Writes to $OUT (default benchmarks/gpu): bench_step.json (BNP/SGD and
# BNP/BN step-time ratios, compile times, peak memory for the FC, CNN and
# ResNet cases) and runs/ (the CNN batch-2 CIFAR-10 comparison, BNP, BN and
# Batch Renorm, as long as the time budget allows). Needs CIFAR-10 in $DATA.
set -euo pipefail
OUT=${OUT:-benchmarks/gpu}
DATA=${DATA:-../shared/data}
mkdir -p "$OUT"
python -c 'import jax; print(jax.devices())' | tee "$OUT/devices.txt"
if [[ -n "${QUICK:-}" ]]; then
  CASES=(fc60 cnn128); STEPS=(--steps 3 --warmup 1 --compile-reps 1)
  SUBSET=(--train-subset 64 --test-subset 64); BUDGET=120
else
  CASES=(fc1 fc60 fc512 cnn2 cnn128 cnn128same resnet18 resnet)
  STEPS=(--compile-reps 2); SUBSET=(); BUDGET=240
fi
# Step times: about 3 minutes on a GPU.
python benchmarks/bench_step.py --cases "${CASES[@]}" "${STEPS[@]}" \
    --out "$OUT/bench_step.json" | tee "$OUT/bench_step.txt"
# The CNN at batch 2 on CIFAR-10 for the rest of the budget; SIGTERM stops
# the harness at a step boundary and keeps the finished runs.
timeout --signal=TERM "$BUDGET" python -m bnp_optax.experiments suite \
    fig5-bs2 --methods bnp,bn,renorm --epochs 1 --evals-per-epoch 4 \
    "${SUBSET[@]}" --data-dir "$DATA" --out "$OUT/runs" --no-progress \
    | tee "$OUT/fig5-bs2.txt" || true
ls -R "$OUT" | head -40
