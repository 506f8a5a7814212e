"""A/B of BNP implementation choices in one process, rounds interleaved.

Run from the repository root (``PYTHONPATH=.`` to measure this checkout)::

  python benchmarks/bench_ab.py --case resnet18 --rounds 10 \\
      sgd bnp:einsum_absorb+unfolded_stats bnp

A variant is ``sgd`` or ``bnp`` (as in ``bench_step.py``), optionally with
``:``-separated ``+``-joined substitutions that put back an earlier code path
while the step is traced:

- ``einsum_absorb``: the bias absorption ``sum mu/s G_w`` of convolutions as
  the contraction ``c,abcd->d`` (before: XLA:CPU copied the kernel gradient
  into the kernel's layout and reduced its window slowly);
- ``unfolded_stats``: statistics of tall inputs summed as ``(rows, C)``,
  never folded (``statistics._fold_factor``);
- ``einsum_dense_absorb``: Dense layers' absorption as the contraction (a
  matrix-vector product XLA:CPU compiles once per layer), convolutions as
  now;
- ``gemv_stats`` / ``no_gemv_stats``: column sums of inputs of at most 128
  rows as a GEMV for every width / for none (now: 256 columns and more).

Each variant is compiled ahead of time; then one step of each per round, in
a rotating order. Reported: the median wall and process CPU time and the
medians of the per-round ratios to the first variant, compile time (trace,
lower and compile) and kernels. The first outputs of the BNP variants are
compared (largest difference relative to the largest value).
"""

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_step  # pylint: disable=g-import-not-at-top

from bnp_optax._src import statistics  # pylint: disable=g-import-not-at-top
from bnp_optax._src import transform  # pylint: disable=g-import-not-at-top


def _einsum_absorbed_sum(view, scaled_mean, g_w):
  letters = 'abcdefghijklmnopqrstuvwxyz'[: len(view.shape)]
  return jnp.einsum(
      ''.join(letters[p] for p in view.statistics_axes) + ',' + letters
      + '->' + ''.join(letters[p] for p in view.bias_axes),
      scaled_mean, g_w, precision=jax.lax.Precision.HIGHEST)


def _einsum_dense_absorbed_sum(view, scaled_mean, g_w):
  if view.spatial:
    return _REDUCED_ABSORBED_SUM(view, scaled_mean, g_w)
  return _einsum_absorbed_sum(view, scaled_mean, g_w)


_REDUCED_ABSORBED_SUM = transform._absorbed_sum  # pylint: disable=protected-access

SUBSTITUTIONS = {
    'einsum_absorb': [(transform, '_absorbed_sum', _einsum_absorbed_sum)],
    'einsum_dense_absorb': [
        (transform, '_absorbed_sum', _einsum_dense_absorbed_sum)],
    'unfolded_stats': [(statistics, '_fold_factor', lambda rows: 1)],
    'gemv_stats': [(statistics, '_CPU_GEMV_MIN_COLUMNS', 0)],
    'no_gemv_stats': [(statistics, '_CPU_GEMV_MIN_COLUMNS', 1 << 62)],
}


@contextlib.contextmanager
def substituted(names):
  undo = []
  try:
    for name in filter(None, names.split('+')):
      for module, attr, new in SUBSTITUTIONS[name]:
        undo.append((module, attr, getattr(module, attr)))
        setattr(module, attr, new)
    yield
  finally:
    for module, attr, old in reversed(undo):
      setattr(module, attr, old)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('variants', nargs='+')
  p.add_argument('--case', default='cnn128same')
  p.add_argument('--rounds', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  args = p.parse_args(argv)
  case = bench_step._cases(False, None)[args.case]  # pylint: disable=protected-access
  x, y, vanilla, bn_vars = bench_step.case_inputs(case)
  compiled, states, compile_s, kernels = {}, {}, {}, {}
  for v in args.variants:
    base, _, names = v.partition(':')
    step, state = bench_step.VARIANTS[base](case, vanilla, bn_vars)
    with substituted(names):
      jax.clear_caches()
      t0 = time.perf_counter()
      compiled[v] = jax.jit(step).lower(state, x, y).compile()
      compile_s[v] = time.perf_counter() - t0
    states[v] = state
    kernels[v] = bench_step.hlo_summary(compiled[v].as_text())['kernels']
  bnps = [v for v in args.variants if v.startswith('bnp')]
  outs = {v: jax.tree.leaves(compiled[v](states[v], x, y)) for v in bnps}
  for v in bnps[1:]:
    diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
               for a, b in zip(outs[bnps[0]], outs[v]))
    print(f'{v} vs {bnps[0]}: outputs differ by {diff:.1e} (relative)')
  for _ in range(args.warmup):
    for v in args.variants:
      jax.block_until_ready(compiled[v](states[v], x, y))
  wall = {v: [] for v in args.variants}
  cpu = {v: [] for v in args.variants}
  order = list(args.variants)
  for r in range(args.rounds):
    for v in order[r % len(order):] + order[:r % len(order)]:
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled[v](states[v], x, y))
      wall[v].append(time.perf_counter() - t0)
      cpu[v].append(time.process_time() - c0)
  ref = order[0]
  print(f'{args.case}: {args.rounds} rounds, ratios: medians of per-round '
        f'ratios to {ref}')
  for v in order:
    w, c = np.asarray(wall[v]), np.asarray(cpu[v])
    rw, rc = w / np.asarray(wall[ref]), c / np.asarray(cpu[ref])
    print(f'{v:36s} wall {np.median(w) * 1e3:9.2f} ms {np.median(rw):.3f}'
          f'  CPU {np.median(c) * 1e3:9.2f} ms {np.median(rc):.3f} (IQR '
          f'{np.percentile(rc, 25):.3f}-{np.percentile(rc, 75):.3f})'
          f'  compile {compile_s[v]:.2f} s  kernels {kernels[v]}')


if __name__ == '__main__':
  main()
