"""Where a step's compile time goes: kernels, and how many XLA compiles.

Run from the repository root (``PYTHONPATH=.`` to measure this checkout)::

  python benchmarks/compile_kernels.py --case mlp100 \\
      sgd bnp:einsum_dense_absorb+gemv_stats bnp

For each variant (``sgd``/``bnp``/``bn``/``sgdstats`` as in
``bench_step.py``, with ``bench_ab.py``'s substitutions after a ``:``), the
step is traced, lowered and compiled once (fresh caches) with XLA's dump
switched on. Reported: the process CPU time of the lowering and of the
compilation, the kernels of the optimized HLO (as ``bench_step.py`` counts
them) and the LLVM modules XLA:CPU compiled for the step. XLA:CPU compiles
one module per *distinct* kernel: the identical fusions of same-shape
layers share one, so a deep network of one layer shape costs few modules;
ops that it emits one by one (matrix-vector products, concatenations)
cost one module each. Single compilations on a shared machine: read the
CPU times as rough, the counts as exact.
"""

import argparse
import collections
import os
import pathlib
import re
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix='xla_dump_')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + (
    f' --xla_dump_to={DUMP} --xla_dump_hlo_module_re=.*jit_step.*'))

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ab  # noqa: E402
import bench_step  # noqa: E402


def _llvm_modules() -> dict[str, int]:
  """``{dumped module: number of optimized LLVM IR files}``."""
  counts = collections.Counter()
  for path in pathlib.Path(DUMP).glob('*.ir-with-opt.ll'):
    m = re.match(r'(module_\d+)\.', path.name)
    if m:
      counts[m.group(1)] += 1
  return counts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('variants', nargs='+')
  p.add_argument('--case', default='mlp100')
  args = p.parse_args(argv)
  case = bench_step._cases(False, None)[args.case]  # pylint: disable=protected-access
  x, y, vanilla, bn_vars = bench_step.case_inputs(case)
  print(f'{args.case}: {bench_step._layer_count(vanilla)} layers '  # pylint: disable=protected-access
        f'(XLA dump in {DUMP})')
  for v in args.variants:
    base, _, names = v.partition(':')
    step, state = bench_step.VARIANTS[base](case, vanilla, bn_vars)
    before = set(_llvm_modules())
    with bench_ab.substituted(names):
      jax.clear_caches()
      c0 = time.process_time()
      lowered = jax.jit(step, donate_argnums=0).lower(state, x, y)
      c1 = time.process_time()
      compiled = lowered.compile()
      c2 = time.process_time()
    hlo = bench_step.hlo_summary(compiled.as_text())
    modules = sum(n for m, n in _llvm_modules().items() if m not in before)
    print(f'{v:40s} lower {c1 - c0:6.2f} s  compile {c2 - c1:6.2f} s CPU  '
          f'kernels {hlo["kernels"]:5d}  LLVM modules {modules}', flush=True)


if __name__ == '__main__':
  main()
