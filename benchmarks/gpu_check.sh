#!/bin/bash
# The GPU check: BNP's step against SGD's (and BatchNorm's) on a GPU, with
# compile times and kernel counts, then the CNN at batch 2 on CIFAR-10 for
# what is left of the time budget. About 6 minutes on a GPU machine.
#
#   python benchmarks/make_gpu_data.py --source ../shared/data   # once, here
#   PYTHONPATH=. bash benchmarks/gpu_check.sh        # on the GPU machine
#   QUICK=1 OUT=/tmp/gpu PYTHONPATH=. bash benchmarks/gpu_check.sh  # CPU dry run
#
# The GPU machine gets a copy of the checkout, not ../shared beside it: the
# CIFAR-10 subset (10k train, 2k test, ~32 MB compressed) travels in the
# ignored folder gpu_data/ (carry it), which DATA names by default.
#
# Writes to $OUT (default benchmarks/gpu), 7 files, no subfolders:
#   devices.txt          the devices jax sees
#   step.json, step.txt  bench_step.py: BNP/SGD and BNP/BN step-time ratios
#                        (wall and process CPU time), compile times, kernels
#                        and kernels added per layer, for fc60, cnn128,
#                        resnet (ResNet-18 at batch 128), fc1, fc8
#   depth.json           compile time and kernels against depth: mlp10,
#                        mlp100, resnet20, resnet56
#   summary.txt          the ratios the performance issue asks for
#   fig5-bs2.txt, fig5-bs2.tar.gz   the CIFAR-10 CNN at batch 2 (BNP, BN,
#                        Batch Renorm), as many runs as the budget allows
set -euo pipefail
OUT=${OUT:-benchmarks/gpu}
DATA=${DATA:-gpu_data}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ ! -f "$DATA/cifar10/cifar10_train.npz" && ! -f "$DATA/cifar10_train.npz" ]]; then
  echo "no CIFAR-10 subset in $DATA: run python benchmarks/make_gpu_data.py" \
       "on a machine with ../shared/data and carry gpu_data/" >&2
  exit 2
fi
$PY -c 'import jax; print(jax.__version__, jax.devices())' | tee "$OUT/devices.txt"
if [[ -n "${QUICK:-}" ]]; then
  CASES=(fc60 cnn128); DEPTH=(mlp10 resnet20)
  STEPS=(--steps 3 --warmup 1 --compile-reps 1); DSTEPS=(--steps 2 --warmup 1 --compile-reps 1)
  SUBSET=(--train-subset 64 --test-subset 64); BUDGET=60
  LIMITS=(900 600)  # a shared CPU compiles slowly
else
  CASES=(fc60 cnn128 resnet fc1 fc8)  # the most wanted first
  DEPTH=(mlp10 mlp100 resnet20 resnet56)
  STEPS=(--steps 200 --compile-reps 1); DSTEPS=(--steps 20 --compile-reps 1)
  SUBSET=(); BUDGET=60
  LIMITS=(180 75)  # seconds; bench_step.py writes its JSON after every case
fi
# Step times, compile times and kernels: at most 3 minutes (the cases not
# reached by then are left out of step.json).
timeout --signal=INT "${LIMITS[0]}" $PY benchmarks/bench_step.py --cases "${CASES[@]}" "${STEPS[@]}" \
    --out "$OUT/step.json" > "$OUT/step.txt" 2>&1 || cat "$OUT/step.txt"
# Compile time against depth: at most 75 seconds.
timeout --signal=INT "${LIMITS[1]}" $PY benchmarks/bench_step.py --cases "${DEPTH[@]}" --variants sgd bnp \
    "${DSTEPS[@]}" --out "$OUT/depth.json" >> "$OUT/step.txt" 2>&1 \
    || tail -20 "$OUT/step.txt"
$PY - "$OUT" <<'PYEOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ('step.json', 'depth.json'):
  path = out / name
  if not path.is_file():
    print(f'{name}: missing'); continue
  data = json.loads(path.read_text())
  d = data['device']
  print(f"{name}: {d['platform']} {d['device_kind']}, jax {d['jax']}")
  for r in data['results']:
    q = r['ratios']['bnp/sgd']
    bn = r['ratios'].get('bnp/bn')
    v = r['variants']
    print(f"  {r['case']:<11} batch {r['batch_size']:>3}: BNP/SGD "
          f"{q['paired']:.3f} (of medians {q['of_medians']:.3f})"
          + (f", BNP/BN {bn['paired']:.3f}" if bn else '')
          + f", SGD {v['sgd']['median_ms']:.3f} ms; compile BNP/SGD "
          f"{q['compile']:.2f} ({v['sgd']['lower_s'] + v['sgd']['compile_s']:.1f}"
          f" s SGD); kernels {v['sgd']['hlo']['kernels']} / "
          f"{v['bnp']['hlo']['kernels']}, {q['kernels_added_per_layer']:+.1f} "
          f"per layer ({r['layers']} layers)")
PYEOF
# The CNN at batch 2 on the CIFAR-10 subset for the rest of the budget;
# SIGTERM stops the harness at a step boundary and keeps the finished runs.
timeout --signal=TERM "$BUDGET" $PY -m bnp_optax.experiments suite \
    fig5-bs2 --methods bnp,bn,renorm --epochs 1 --evals-per-epoch 4 \
    "${SUBSET[@]}" --data-dir "$DATA" --out "$OUT/runs" --no-progress \
    > "$OUT/fig5-bs2.txt" 2>&1 || true
tail -5 "$OUT/fig5-bs2.txt"
if [[ -d "$OUT/runs" ]]; then
  tar -czf "$OUT/fig5-bs2.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
fi
ls -la "$OUT"
