#!/usr/bin/env bash
# The ViT comparison of docs/transformers.md on one GPU, about 4 minutes.
#
# Ten (suite, method) pairs run as ten processes side by side on the one GPU
# (a 140k-parameter ViT is far too small to fill it alone), each over its
# learning-rate grid (3 rates) and SEEDS seeds on a held-out split:
#
#   vit-ln:     vanilla (SGD+momentum), bnp (BNP+SGD+momentum), adamw, bnp_adamw
#   vit-none:   the same four without any normalisation
#   vit-dyt:    vanilla, adamw with Dynamic Tanh
#
# 60 runs at the defaults. Per run: EPOCHS (5) epochs of floor(n / 128)
# steps on n = TRAIN_SUBSET training images (default: 20,000, or 85% of
# DATA_DIR/cifar10's training images if it holds fewer), drawn from the
# training set minus the 10% held out for choosing the rate: 5 x 156 = 780
# steps per run on 20,000 images. The test set: TEST_SUBSET (default: all,
# at most 10,000) images.
#
# Usage (from the repository root; data in the harness's cifar10 format,
# DATA_DIR/cifar10/cifar10_{train,test}.npz):
#
#   DATA_DIR=gpu_data bash docs/transformers/gpu_run.sh
#   python docs/transformers/build.py      # page tables and figure
#
# Environment: DATA_DIR (gpu_data), OUT (docs/transformers/runs/gpu),
# EPOCHS (5), SEEDS (2x: seeds 0,1), TRAIN_SUBSET (20000), TEST_SUBSET
# (all), PYTHON (python3), LOGS (results/transformers-gpu-logs, one log per
# process). Reruns skip the runs already written (--skip-existing).
set -u
cd "$(dirname "$0")/../.."
DATA_DIR=${DATA_DIR:-gpu_data}
OUT=${OUT:-docs/transformers/runs/gpu}
EPOCHS=${EPOCHS:-5}
SEEDS=${SEEDS:-2x}
PYTHON=${PYTHON:-python3}
if [ -z "${TRAIN_SUBSET:-}" ]; then
  TRAIN_SUBSET=$("$PYTHON" -c "
import numpy as np, sys
try:
  n = len(np.load('$DATA_DIR/cifar10/cifar10_train.npz')['y'])
except OSError:
  n = len(np.load('$DATA_DIR/cifar10_train.npz')['y'])
print(min(20000, int(0.85 * n)))" 2>/dev/null)
  [[ "$TRAIN_SUBSET" =~ ^[0-9]+$ ]] || TRAIN_SUBSET=20000
fi
echo "training images per run: $TRAIN_SUBSET, epochs: $EPOCHS, steps per run: $(( EPOCHS * (TRAIN_SUBSET / 128) ))"
SUBSETS=()
[ -n "${TRAIN_SUBSET:-}" ] && SUBSETS+=(--train-subset "$TRAIN_SUBSET")
[ -n "${TEST_SUBSET:-}" ] && SUBSETS+=(--test-subset "$TEST_SUBSET")
export PYTHONPATH=${PYTHONPATH:-.}
# Ten processes share the GPU: no process may take most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
LOGS=${LOGS:-results/transformers-gpu-logs}  # ignored by git
mkdir -p "$OUT" "$LOGS"

SGD_GRID=0.01,0.03,0.1
ADAMW_GRID=0.0003,0.001,0.003

run() {  # suite method grid
  "$PYTHON" -m bnp_optax.experiments suite "$1" --methods "$2" \
    --lr-grid "$2:$3" --validation-split 0.1 --seeds "$SEEDS" \
    --epochs "$EPOCHS" "${SUBSETS[@]}" --data-dir "$DATA_DIR" --out "$OUT" \
    --checkpoint never --no-progress --skip-existing \
    --sweep-summary "$OUT/sweep-$1-$2.json" \
    > "$LOGS/$1-$2.log" 2>&1
  echo "$1 $2: exit $?"
}

start=$(date +%s)
for suite in vit-ln vit-none; do
  run "$suite" vanilla "$SGD_GRID" &
  run "$suite" bnp "$SGD_GRID" &
  run "$suite" adamw "$ADAMW_GRID" &
  run "$suite" bnp_adamw "$ADAMW_GRID" &
done
run vit-dyt vanilla "$SGD_GRID" &
run vit-dyt adamw "$ADAMW_GRID" &
wait
echo "all done in $(( $(date +%s) - start ))s; runs: $(find "$OUT" -name 'vit*-seed*.json' | wc -l)"
