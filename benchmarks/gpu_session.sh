#!/usr/bin/env bash
# Everything this project runs on a lent GPU machine, in one call of under
# ten minutes (the device time of a task is 15 minutes, start included):
#
#   1. benchmarks/gpu_check.sh: BNP's step against SGD's and BatchNorm's,
#      compile times and kernels (issue 24), on a quiet GPU, first;
#   2. then, side by side on the same GPU (small models leave it mostly
#      idle), the comparison page's CIFAR-10 workloads
#      (docs/comparison/gpu.sh) and the ViT comparison of the Transformer
#      page (docs/transformers/gpu_run.sh), both under one deadline.
#
# Prepare here (the GPU machine gets the checkout, not ../shared):
#   python benchmarks/make_gpu_data.py --source ../shared/data   # gpu_data/
# Run there, carrying gpu_data:
#   OUT=$OUT bash benchmarks/gpu_session.sh
# Dry run on a CPU (tiny budgets, nothing kept): QUICK=1 OUT=/tmp/g bash ...
# Comes back as five files in $OUT: bench.tgz, comparison.tgz, vit.tgz,
# logs.tgz and session.log; unpack them at the repository root:
#   tar -xzf bench.tgz -C benchmarks/gpu_runs/   (step.json, depth.json, ...)
#   tar -xzf comparison.tgz   (docs/comparison/runs/...)
#   tar -xzf vit.tgz          (docs/transformers/runs/gpu/...)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_session}
PHASE2=${PHASE2:-330}   # seconds for the training runs of step 2
mkdir -p "$OUT"
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'
  python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'

  echo "== 1. step benchmark"
  mkdir -p "$OUT/bench"
  if [[ -n "${QUICK:-}" ]]; then
    QUICK=1 OUT="$OUT/bench" timeout 900 bash benchmarks/gpu_check.sh
  else
    OUT="$OUT/bench" timeout 200 bash benchmarks/gpu_check.sh
  fi
  tar -czf "$OUT/bench.tgz" -C "$OUT/bench" . && rm -rf "$OUT/bench"

  echo "== 2. comparison and ViT runs, $PHASE2 s"
  start=$(date +%s)
  if [[ -n "${QUICK:-}" ]]; then
    QUICK=1 TOTAL=$PHASE2 PY=python3 bash docs/comparison/gpu.sh gpu_data &
    EPOCHS=1 TRAIN_SUBSET=300 TEST_SUBSET=64 SEEDS=1x OUT=results/vit_dry \
      timeout "$PHASE2" bash docs/transformers/gpu_run.sh &
  else
    TOTAL=$PHASE2 PY=python3 \
      bash docs/comparison/gpu.sh gpu_data &
    timeout -k 5 "$PHASE2" bash docs/transformers/gpu_run.sh &
  fi
  wait
  echo "phase 2 took $(( $(date +%s) - start )) s"
  tar -czf "$OUT/comparison.tgz" docs/comparison/runs 2>/dev/null
  tar -czf "$OUT/vit.tgz" docs/transformers/runs/gpu 2>/dev/null
  tar -czf "$OUT/logs.tgz" results/logs results/transformers-gpu-logs 2>/dev/null
  date -u
} 2>&1 | tee "$OUT/session.log"
ls -la "$OUT"
