"""The scaling and depth tables of RESULTS.md, from bench_step.py's JSON.

BNP's overhead per step as the work grows: MLP width 100 -> 4096 (batch 60),
FC batch 1 -> 512, CNN batch 2 -> 256, and the performance issue's cases.
``benchmarks/RESULTS.md`` holds the table between the markers
``<!-- scaling-table-start -->`` and ``<!-- scaling-table-end -->`` (the docs
include it from there); this script rewrites it from the JSON, or with
``--check`` fails if it differs (the tests run that).

Usage::

  python benchmarks/bench_step.py --cases scaling cnn128same resnet18 \\
      --compile-reps 2 --out benchmarks/results_scaling_cpu.json
  python benchmarks/bench_step.py --cases depth --variants sgd bnp \\
      --compile-reps 2 --out benchmarks/results_depth_cpu.json
  python benchmarks/scaling_table.py            # rewrite RESULTS.md's tables
  python benchmarks/scaling_table.py --check
"""

import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_JSON = HERE / 'results_scaling_cpu.json'
DEPTH_BEFORE_JSON = HERE / 'results_depth_before_cpu.json'
DEPTH_JSON = HERE / 'results_depth_cpu.json'
RESULTS_MD = HERE / 'RESULTS.md'
START, END = '<!-- scaling-table-start -->', '<!-- scaling-table-end -->'
DEPTH_START = '<!-- depth-table-start -->'
DEPTH_END = '<!-- depth-table-end -->'

# The depth cases: (case, what it is).
DEPTH_ORDER = (
    ('mlp10', 'MLP 32x10'),
    ('mlp50', 'MLP 32x50'),
    ('mlp100', 'MLP 32x100'),
    ('mlp300', 'MLP 32x300'),
    ('resnet20', 'ResNet-20'),
    ('resnet56', 'ResNet-56'),
    ('resnet110', 'ResNet-110'),
)

# What grows from one case to the next, in the order of the table.
ORDER = (
    ('fc60', 'MLP width 100 (784-100x3-10), batch 60'),
    ('fc60w400', 'MLP width 400'),
    ('fc60w1600', 'MLP width 1600'),
    ('fc60w4096', 'MLP width 4096'),
    ('fc1', 'MLP width 100, batch 1'),
    ('fc8', 'batch 8'),
    ('fc512', 'batch 512'),
    ('cnn2', '5-layer CNN (VALID), batch 2'),
    ('cnn16', 'batch 16'),
    ('cnn128', 'batch 128'),
    ('cnn256', 'batch 256'),
    ('cnn128same', '5-layer CNN, SAME padding, batch 128'),
    ('resnet18', 'ResNet-18 (32x32 inputs), batch 32'),
)


def _ratio(r: dict, key: str) -> str:
  q = r['ratios'].get(key)
  if not q:
    return 'n/a'
  cpu = q.get('paired_cpu')
  return f'{q["paired"]:.3f}' + (f' ({cpu:.3f})' if cpu else '')


def _compile(r: dict) -> str:
  q = r['ratios']['bnp/sgd']
  cpu = q.get('compile_cpu')
  return f'{cpu:.2f}' if cpu else f'{q["compile"]:.2f}'


def render(bench: dict) -> str:
  """The markdown table (with its provenance line) of a results JSON."""
  by_case = {r['case']: r for r in bench['results']}
  missing = [c for c, _ in ORDER if c not in by_case]
  if missing:
    raise ValueError(f'{RESULTS_JSON.name} lacks the cases {missing}')
  device = bench.get('device', {})
  lines = [
      f'Measured on {device.get("platform", "?")} '
      f'({device.get("cpu_count", "?")} CPU cores, jax '
      f'{device.get("jax", "?")}); medians of per-round paired ratios, '
      'wall time and in parentheses process CPU time; compile: CPU time of '
      'trace + lower + compile.',
      '',
      '| case | what grows | SGD step ms | BNP/SGD | BNP/BN | compile '
      'BNP/SGD | kernels SGD / BNP |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for case, what in ORDER:
    r = by_case[case]
    v = r['variants']
    lines.append(
        f'| {case} | {what} | {v["sgd"]["median_ms"]:.3g} | '
        f'{_ratio(r, "bnp/sgd")} | {_ratio(r, "bnp/bn")} | {_compile(r)} | '
        f'{v["sgd"]["hlo"]["kernels"]} / {v["bnp"]["hlo"]["kernels"]} |')
  return '\n'.join(lines)


def _compile_cpu(v: dict) -> float:
  return v['compile_cpu_s']


def render_depth(before: dict, after: dict) -> str:
  """The depth table: compile time and kernels before and after the change."""
  old = {r['case']: r for r in before['results']}
  new = {r['case']: r for r in after['results']}
  missing = [c for c, _ in DEPTH_ORDER if c not in old or c not in new]
  if len(missing) == len(DEPTH_ORDER):
    raise ValueError('the depth JSONs have no case in common')
  device = after.get('device', {})
  lines = [
      f'Measured on {device.get("platform", "?")} '
      f'({device.get("cpu_count", "?")} CPU cores, jax '
      f'{device.get("jax", "?")}), before (`{DEPTH_BEFORE_JSON.name}`) and '
      f'after (`{DEPTH_JSON.name}`) the change, in two runs; compile: '
      'process CPU time of trace + lower + compile (SGD: the after run), '
      'the median of the fresh compilations of each run (`compile_reps`); '
      'kernels: top-level ops of the compiled step; step: median of '
      'per-round paired ratios of process CPU time.',
      '',
      '| case | layers | batch | compile CPU s SGD | BNP before / after | '
      'compile BNP/SGD before / after | kernels SGD | BNP before / after | '
      'added per layer before / after | step BNP/SGD before / after |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for case, what in DEPTH_ORDER:
    if case in missing:
      continue
    o, n = old[case], new[case]
    qo, qn = o['ratios']['bnp/sgd'], n['ratios']['bnp/sgd']
    vo, vn = o['variants'], n['variants']
    layers = n.get('layers') or o.get('layers')
    added = lambda v, layers=layers: (
        v['bnp']['hlo']['kernels'] - v['sgd']['hlo']['kernels']) / layers
    lines.append(
        f'| {what} | {layers} | {n["batch_size"]} | '
        f'{_compile_cpu(vn["sgd"]):.2f} | '
        f'{_compile_cpu(vo["bnp"]):.2f} / {_compile_cpu(vn["bnp"]):.2f} | '
        f'{qo["compile_cpu"]:.2f} / {qn["compile_cpu"]:.2f} | '
        f'{vn["sgd"]["hlo"]["kernels"]} | '
        f'{vo["bnp"]["hlo"]["kernels"]} / {vn["bnp"]["hlo"]["kernels"]} | '
        f'{added(vo):.1f} / {added(vn):.1f} | '
        f'{qo["paired_cpu"]:.3f} / {qn["paired_cpu"]:.3f} |')
  if missing:
    lines += ['', f'Not measured in both runs: {", ".join(missing)}.']
  return '\n'.join(lines)


def replace_block(text: str, table: str, start: str = START,
                  end: str = END) -> str:
  pattern = re.compile(re.escape(start) + r'\n.*?' + re.escape(end), re.S)
  if not pattern.search(text):
    raise ValueError(f'{RESULTS_MD.name} lacks the markers {start} / {end}')
  return pattern.sub(lambda _: f'{start}\n{table}\n{end}', text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help="fail if RESULTS.md's table is not the JSON's")
  args = parser.parse_args(argv)
  table = render(json.loads(RESULTS_JSON.read_text()))
  text = RESULTS_MD.read_text()
  new = replace_block(text, table)
  if DEPTH_JSON.is_file():
    depth = render_depth(json.loads(DEPTH_BEFORE_JSON.read_text()),
                         json.loads(DEPTH_JSON.read_text()))
    new = replace_block(new, depth, DEPTH_START, DEPTH_END)
    table += '\n\n' + depth
  if args.check:
    if new != text:
      print(f'{RESULTS_MD} is out of date: run python {__file__}',
            file=sys.stderr)
      return 1
    return 0
  RESULTS_MD.write_text(new)
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
