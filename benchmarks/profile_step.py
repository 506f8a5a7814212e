"""Per-kernel profile of a training step, attributed by the HLO's op names.

Run from the repository root::

  XLA_FLAGS=--xla_cpu_enable_xprof_traceme PYTHONPATH=. \\
      python benchmarks/profile_step.py --case resnet18 --steps 3 sgd bnp

Each variant (as in ``bench_step.py``) is compiled and warmed up, then
``--steps`` steps of each run under ``jax.profiler.trace`` (a Perfetto
trace). The durations of the kernels (the thunks XLA:CPU names after its
HLO instructions) are summed per step, over all threads, and each kernel is
put in a category by the ``op_name`` of its instruction in the optimized
HLO: ``forward``, ``backward`` (``transpose(jvp(...))``), ``statistics``
(``jvp(...)/Conv_k/reduce_sum`` and the shifts next to it), ``optimizer``
(outside the model's ``jvp``) and ``no op name`` (copies, transposes,
iotas). Printed: the total per category and the largest kernels of each.
Tracing slows the step; read the split, not the absolute times.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_step  # pylint: disable=g-import-not-at-top

# The statistics' ops under a layer's path (also inside the platform switch
# of statistics._shifted_two_pass); a bias add of the layer may land here too.
_STATS = re.compile(r'/(Conv|Dense)\w*_\d+/(cond/branch_\d+_fun/)?'
                    r'(reduce_sum|sub|square|mul|add|slice|div|max|tile|'
                    r'concatenate|broadcast_in_dim|dot_general)$')


def _op_names(hlo_text):
  """``{instruction: op_name}`` for the ENTRY computation's instructions."""
  entry = hlo_text[hlo_text.index('\nENTRY'):]
  names = {}
  for line in entry.splitlines()[1:]:
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
    if m:
      op = re.search(r'op_name="([^"]+)"', line)
      names[m.group(1)] = op.group(1) if op else ''
  return names


def category(op_name):
  if not op_name:
    return 'no op name'
  if 'transpose(jvp(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    layer_matmul = re.search(r'/(Conv|Dense)\w*_\d+/(conv_general_dilated|'
                             r'dot_general)$', op_name)
    if _STATS.search(op_name) and not layer_matmul:
      return 'statistics'
    return 'forward'
  return 'optimizer'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('variants', nargs='+')
  p.add_argument('--case', default='cnn128same')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--top', type=int, default=8)
  args = p.parse_args(argv)
  case = bench_step._cases(False, None)[args.case]  # pylint: disable=protected-access
  x, y, vanilla, bn_vars = bench_step.case_inputs(case)
  compiled, states, names = {}, {}, {}
  for v in args.variants:
    step, states[v] = bench_step.VARIANTS[v](case, vanilla, bn_vars)
    compiled[v] = jax.jit(step)
    names[v] = _op_names(
        compiled[v].lower(states[v], x, y).compile().as_text())
    for _ in range(2):
      jax.block_until_ready(compiled[v](states[v], x, y))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.steps):
        for v in args.variants:
          with jax.profiler.TraceAnnotation(f'STEP_{v}'):
            jax.block_until_ready(compiled[v](states[v], x, y))
    path, = glob.glob(f'{tmp}/**/*.trace.json.gz', recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']
  steps = [e for e in events if e['name'].startswith('STEP_')]
  for v in args.variants:
    spans = [(e['ts'], e['ts'] + e['dur']) for e in steps
             if e['name'] == f'STEP_{v}']
    per_kernel = collections.Counter()
    for e in events:
      if e['name'] in names[v] and any(a <= e['ts'] <= b for a, b in spans):
        per_kernel[e['name']] += e['dur'] / 1e3 / args.steps
    wall = sum(b - a for a, b in spans) / 1e3 / args.steps
    by_category = collections.defaultdict(list)
    for kernel, ms in per_kernel.items():
      by_category[category(names[v][kernel])].append((ms, kernel))
    print(f'== {v}: {wall:.1f} ms a step (traced), kernel time summed over '
          f'threads {sum(per_kernel.values()):.1f} ms')
    for cat, items in sorted(by_category.items()):
      print(f'  {cat:12s} {sum(ms for ms, _ in items):9.2f} ms  '
            f'{len(items)} kernels')
      for ms, kernel in sorted(items, reverse=True)[:args.top]:
        print(f'    {ms:8.2f} ms  {kernel:28s} {names[v][kernel][-60:]}')


if __name__ == '__main__':
  main()
