"""Rebuilds the comparison page's figure and tables from its committed runs.

``docs/comparison.md`` ("BNP against today's methods") is made from the run
JSON files under ``docs/comparison/runs/<suite>/`` (written by
``python docs/comparison/run.py SUITE``) and their learning-rate sweep
summaries (``sweep-METHOD.json``). This script redraws the figure
(``docs/_static/comparison/accuracy_vs_budget.png``, one panel per
workload) and rewrites the tables between the page's
``<!-- BEGIN numbers ID -->`` and ``<!-- END numbers ID -->`` markers,
offline. A workload or method without runs gets a row saying why
(:data:`MISSING`). Run it again when more runs land (e.g. the GPU's).
``--check`` rewrites nothing and fails if the page differs from what the
committed JSON gives (the test suite runs it).

Usage::

  python docs/comparison/build.py          # figure and tables
  python docs/comparison/build.py --check  # tables up to date?
"""

import argparse
import dataclasses
import json
import math
import pathlib
import re
import sys

import numpy as np

from bnp_optax import experiments

HERE = pathlib.Path(__file__).resolve().parent
DOCS = HERE.parent
PAGE = DOCS / 'comparison.md'
RUNS = HERE / 'runs'
FIGURE = DOCS / '_static' / 'comparison' / 'accuracy_vs_budget.png'

_GPU = ('not run: needs a GPU (docs/comparison/gpu.sh, or '
        'benchmarks/gpu_session.sh with the ViT runs); the 2-core CPU cannot '
        'run it, and the GPU loan asked for on 2026-12-04 was refused')


@dataclasses.dataclass(frozen=True)
class Workload:
  """One panel and table of the page."""

  suite: str
  title: str
  target: float  # Test accuracy for "budget to target".
  missing: str  # Why there are no runs, when there are none.


WORKLOADS = (
    Workload('cmp-fc-mnist-bs60', 'FC, MNIST, batch 60', 0.96, 'not run'),
    Workload('cmp-fc-mnist-bs1', 'FC, MNIST, batch 1', 0.90, 'not run'),
    Workload('cmp-adam-cnn-mnist-bs60', 'Flax MNIST CNN, batch 60 (Adam '
             'study)', 0.97, 'not run'),
    Workload('cmp-cnn-bs128', 'CNN, CIFAR-10, batch 128', 0.45, _GPU),
    Workload('cmp-cnn-bs2', 'CNN, CIFAR-10, batch 2', 0.35, _GPU),
    Workload('cmp-resnet20-bs128', 'ResNet-20, CIFAR-10, batch 128', 0.45,
             _GPU),
    Workload('cmp-resnet20-bs8', 'ResNet-20, CIFAR-10, batch 8', 0.35, _GPU),
)
# Methods of the comparison that no workload runs, and why.
NOT_RUN = {
    'kfac': ('K-FAC: kfac-jax 0.0.8 (the newest release) cannot be imported '
             'with this jax: it imports distrax, whose import of TensorFlow '
             "Probability's JAX substrate (0.25.0, the newest) fails "
             '(jax.interpreters.xla has no pytype_aval_mappings)'),
}
ADAM_TRIO = ('adamw', 'bnp_adamw', 'centring_adamw')


def _load(suite: str) -> tuple[list[dict], dict[str, dict]]:
  """The suite's runs and its sweep summaries by method."""
  d = RUNS / suite
  if not d.is_dir() or not any(d.glob('*.json')):
    return [], {}
  sweeps = {}
  for f in sorted(d.glob('sweep-*.json')):
    s = json.loads(f.read_text())
    sweeps.update(s['methods'])
  try:
    runs = experiments.load_results([d])
  except ValueError:
    runs = []
  return runs, sweeps


def partial_best(runs, method) -> float | None:
  """The rate chosen from a method's runs when its sweep did not finish.

  The sweep's own rule (``experiments.select_best``) over the rates that have a
  seed-0 run (a GPU process stopped by its time limit leaves some).
  """
  scores = {}
  for r in runs:
    c = r['config']
    if c['method'] == method and c['seed'] == 0:
      scores[c['learning_rate']] = (r['final'].get('validation_accuracy'),
                                    experiments.diverged(r))
  return experiments.select_best(scores) if scores else None


def chosen_runs(runs, sweeps) -> dict[str, list[dict]]:
  """Per method, its runs at the chosen rate (from a partial grid too)."""
  out = {}
  best = {}
  for m in {r['config']['method'] for r in runs}:
    best[m] = (sweeps[m]['best_learning_rate'] if m in sweeps
               else partial_best(runs, m))
  for r in runs:
    m = r['config']['method']
    if best[m] is not None and math.isclose(r['config']['learning_rate'],
                                            best[m]):
      out.setdefault(m, []).append(r)
  return {m: sorted(v, key=lambda r: r['config']['seed'])
          for m, v in out.items()}


def _ratio(run) -> float:
  return run['cost']['ratio']


def at_fraction(run, fraction: float) -> float:
  """Test accuracy at ``fraction`` of the budget (an evaluation point)."""
  total = run['cost']['budget_steps']
  want = round(total * fraction)
  points = [p for p in run['history'] if p['step'] <= want]
  return points[-1]['test_accuracy']


def to_target(run, target: float) -> tuple[float | None, float | None]:
  """``(SGD-step equivalents, recorded train seconds)`` to ``target``."""
  for p in run['history']:
    if p['test_accuracy'] >= target:
      return p['step'] * _ratio(run), p['time_s']
  return None, None


def _mean_range(values, scale=100.0, digits=1) -> str:
  v = scale * np.asarray(values, float)
  if len(v) == 1:
    return f'{v[0]:.{digits}f}'
  return (f'{v.mean():.{digits}f} ({v.min():.{digits}f}-'
          f'{v.max():.{digits}f})')


def _mb(value) -> str:
  return 'n/a' if value is None else f'{value / 2 ** 20:.1f}'


def _label(method: str) -> str:
  return experiments.METHODS[method].label


def workload_table(w: Workload) -> str:
  """Markdown: per method the cost, the budget's accuracies, the target."""
  suite = experiments.SUITES[w.suite]
  runs, sweeps = _load(w.suite)
  if not runs:
    return f'*No runs: {w.missing}.*'
  chosen = chosen_runs(runs, sweeps)
  budget = suite.settings['budget']
  lines = [
      f'Budget B = {budget} SGD steps; target {100 * w.target:g}% test '
      'accuracy.',
      '',
      '| method | optimizer | rate (grid) | seeds | step cost x SGD | steps '
      'in B | compile s (SGD s) | XLA peak MB | test % at B/2 | test % at '
      'B | B to target, SGD steps (train s) | recorded train s / run |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
      '--- |']
  for m in suite.methods:
    grid = sweeps.get(m, {}).get('grid')
    partial = ''
    if grid is None:  # The sweep did not finish: the rates that ran.
      grid = sorted({r['config']['learning_rate'] for r in runs
                     if r['config']['method'] == m}) or None
      partial = ', sweep cut short' if grid else ''
    rate_grid = ('' if not grid else
                 f' ({", ".join(f"{g:g}" for g in grid)}{partial})')
    if m not in chosen:
      ran = [r for r in runs if r['config']['method'] == m]
      if not ran:
        lines.append(f'| {_label(m)} | | not run{rate_grid} | 0 | | | | | | '
                     '| | |')
        continue
      # Every rate "diverged" by the sweep's rule: a non-finite loss, or a
      # final training loss above the untrained network's held-out loss.
      cost = ran[0]['cost']
      accs = [100 * r['final']['test_accuracy'] for r in ran]
      lines.append(
          f'| {_label(m)} | {ran[0]["config"]["optimizer"]} | none: no rate '
          f'ended below its initial loss{rate_grid} | 0 | '
          f'{cost["ratio"]:.2f} | {cost["budget_steps"]} | '
          f'{ran[0]["timing"]["compile_s"]:.1f} '
          f'({cost["sgd_compile_s"]:.1f}) | '
          f'{_mb(cost["memory"]["peak_bytes"])} | | {min(accs):.1f}-'
          f'{max(accs):.1f} over the rates | | |')
      continue
    rs = chosen[m]
    c = rs[0]['config']
    cost = rs[0]['cost']
    hits = [to_target(r, w.target) for r in rs]
    reached = [h for h in hits if h[0] is not None]
    if len(reached) == len(rs):
      target = (f'{np.mean([h[0] for h in reached]):.0f} '
                f'({np.mean([h[1] for h in reached]):.1f})')
    else:
      target = f'not reached ({len(reached)}/{len(rs)})'
    lines.append(
        f'| {_label(m)} | {c["optimizer"]} | {c["learning_rate"]:g}'
        f'{rate_grid} | {len(rs)} | {cost["ratio"]:.2f} | '
        f'{cost["budget_steps"]} | {rs[0]["timing"]["compile_s"]:.1f} '
        f'({cost["sgd_compile_s"]:.1f}) | {_mb(cost["memory"]["peak_bytes"])} '
        f'| {_mean_range([at_fraction(r, 0.5) for r in rs])} | '
        f'{_mean_range([r["final"]["test_accuracy"] for r in rs])} | '
        f'{target} | {np.mean([r["timing"]["train_s"] for r in rs]):.1f} |')
  device = runs[0]['versions']
  lines.append('')
  lines.append(f'Ran on {device["backend"]} ({device["device"]}), jax '
               f'{device["jax"]}; {runs[0]["config"]["num_train"]} training '
               f'images ({runs[0]["config"].get("num_validation", 0)} held '
               f'out), {runs[0]["config"]["num_test"]} test images.')
  return '\n'.join(lines)


def adam_table() -> str:
  """Markdown: AdamW, BNP+AdamW, centring+AdamW (and SGD, BNP+SGD) at B."""
  lines = ['| workload | AdamW | BNP+AdamW | centring+AdamW | BNP+AdamW - '
           'AdamW | centring - AdamW | SGD-m (vanilla) | BNP+SGD-m |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  any_row = False
  for w in WORKLOADS:
    runs, sweeps = _load(w.suite)
    chosen = chosen_runs(runs, sweeps)
    if not any(m in chosen for m in ADAM_TRIO):
      continue
    any_row = True

    def acc(m, chosen=chosen):
      rs = chosen.get(m)
      return None if not rs else float(np.mean(
          [r['final']['test_accuracy'] for r in rs]))

    def cell(m):
      a = acc(m)
      return 'n/a' if a is None else f'{100 * a:.2f}'

    def diff(m):
      a, b = acc(m), acc('adamw')
      return 'n/a' if a is None or b is None else f'{100 * (a - b):+.2f}'

    lines.append(f'| {w.title} | {cell("adamw")} | {cell("bnp_adamw")} | '
                 f'{cell("centring_adamw")} | {diff("bnp_adamw")} | '
                 f'{diff("centring_adamw")} | {cell("vanilla")} | '
                 f'{cell("bnp")} |')
  return '\n'.join(lines) if any_row else '*No runs yet.*'


def glance_table() -> str:
  """Markdown: per workload the best method at B and BNP's best."""
  lines = ['| workload | best at B (test %) | best BNP variant at B (test %) '
           '| BNP variant rank |', '| --- | --- | --- | --- |']
  for w in WORKLOADS:
    runs, sweeps = _load(w.suite)
    chosen = chosen_runs(runs, sweeps)
    if not chosen:
      lines.append(f'| {w.title} | no runs: {w.missing} | | |')
      continue
    score = {m: float(np.mean([r['final']['test_accuracy'] for r in rs]))
             for m, rs in chosen.items()}
    order = sorted(score, key=lambda m: -score[m])
    bnps = [m for m in order if experiments.METHODS[m].bnp]
    best_bnp = bnps[0] if bnps else None
    bnp_cell = ('none run' if best_bnp is None else
                f'{_label(best_bnp)} ({100 * score[best_bnp]:.2f})')
    rank = ('' if best_bnp is None else
            f'{order.index(best_bnp) + 1} of {len(order)}')
    lines.append(f'| {w.title} | {_label(order[0])} '
                 f'({100 * score[order[0]]:.2f}) | {bnp_cell} | {rank} |')
  for m, why in NOT_RUN.items():
    lines.append(f'| ({_label(m)}) | not run: {why} | | |')
  return '\n'.join(lines)


def figure(output: pathlib.Path = FIGURE) -> pathlib.Path | None:
  """Test accuracy against budget (SGD-step equivalents), one panel each."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import
  rows = math.ceil(len(WORKLOADS) / 3)
  fig, axes = plt.subplots(rows, 3, figsize=(14, 4 * rows))
  for ax in axes.flat[len(WORKLOADS):]:
    ax.set_axis_off()
  drawn = False
  cycle = plt.rcParams['axes.prop_cycle'].by_key()['color']
  names = list(experiments.METHODS)
  for ax, w in zip(axes.flat, WORKLOADS):
    runs, sweeps = _load(w.suite)
    chosen = chosen_runs(runs, sweeps)
    ax.set_title(w.title, fontsize=10)
    if not chosen:
      ax.text(0.5, 0.5, 'no runs yet', ha='center', va='center',
              transform=ax.transAxes)
      ax.set_axis_off()
      continue
    drawn = True
    for m, rs in chosen.items():
      x = np.array([p['step'] for p in rs[0]['history']]) * _ratio(rs[0])
      n = min(len(r['history']) for r in rs)
      acc = 100 * np.array([[p['test_accuracy'] for p in r['history'][:n]]
                            for r in rs])
      colour = (experiments.METHODS[m].colour
                or cycle[names.index(m) % len(cycle)])
      style = '--' if experiments.METHODS[m].optimizer in ('adamw', 'muon') \
          else '-'
      ax.plot(x[:n], acc.mean(0), style, color=colour, label=_label(m),
              marker='o', ms=2)
      ax.fill_between(x[:n], acc.min(0), acc.max(0), color=colour,
                      alpha=0.15, linewidth=0)
    ax.axhline(100 * w.target, color='k', lw=0.5, ls=':')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    ax.set_xlabel('budget spent (SGD steps)')
    ax.set_ylabel('test accuracy %')
    finals = [100 * r['final']['test_accuracy'] for rs in chosen.values()
              for r in rs]
    ax.set_ylim(max(0, min(finals) - 15), min(100, max(finals) + 2))
    ax.legend(fontsize=7)
  if not drawn:
    plt.close(fig)
    return None
  fig.suptitle("BNP against today's methods at equal cost (mean over seeds "
               'at the chosen rate; band: min-max)')
  fig.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=100)
  plt.close(fig)
  return output


def blocks() -> dict[str, str]:
  """Every generated block of the page, by marker id."""
  out = {w.suite: workload_table(w) for w in WORKLOADS}
  out['adam-mechanism'] = adam_table()
  out['glance'] = glance_table()
  return out


_MARKER = re.compile(
    r'(<!-- BEGIN numbers (?P<id>[\w-]+) -->\n)(?P<body>.*?)'
    r'(<!-- END numbers (?P=id) -->)', re.S)


def render(page: str, generated: dict[str, str]) -> str:
  """``page`` with every marked block replaced by its generated text."""
  missing = set(generated) - {m['id'] for m in _MARKER.finditer(page)}
  if missing:
    raise ValueError(f'{PAGE.name} lacks markers for {sorted(missing)}')

  def replace(m):
    if m['id'] not in generated:
      raise ValueError(f'{PAGE.name}: unknown block {m["id"]!r}')
    return m.group(1) + generated[m['id']] + '\n' + m.group(4)
  return _MARKER.sub(replace, page)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='fail if the page is not what the JSON gives')
  parser.add_argument('--no-figures', action='store_true',
                      help='rewrite the tables only')
  args = parser.parse_args(argv)
  page = PAGE.read_text()
  new = render(page, blocks())
  if args.check:
    if new != page:
      print(f'{PAGE} is out of date: run python {pathlib.Path(__file__)}',
            file=sys.stderr)
      return 1
    print(f'{PAGE}: tables match the committed runs')
    return 0
  PAGE.write_text(new)
  if not args.no_figures:
    path = figure()
    if path:
      print(f'wrote {path}')
  print(f'wrote {PAGE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
