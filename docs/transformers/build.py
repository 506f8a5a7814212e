"""Rebuilds the Transformer page's tables and figures from its runs.

``docs/transformers.md`` shows the ViT comparison from the run JSON files
committed under ``docs/transformers/runs/<set>/<suite>/`` (``cpu``: the small
run made on the project's 2-core machine; ``gpu``: the larger run of
``docs/transformers/gpu_run.sh``). For each set with runs this script
selects every configuration's learning rate on the held-out split (the
harness's rule, ``bnp_optax.experiments.select_best``), draws
``docs/_static/transformers/vit-<set>.png`` and rewrites the tables between
the page's ``<!-- BEGIN numbers <set>-<table> -->`` and ``<!-- END ... -->``
markers. ``--check`` rewrites nothing and fails if the page differs from
what the committed JSON gives (the test suite runs it). Re-run it after the
GPU runs land.

Usage::

  python docs/transformers/build.py          # figures and tables
  python docs/transformers/build.py --check  # tables up to date?
"""

import argparse
import collections
import json
import math
import pathlib
import re
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
DOCS = HERE.parent
PAGE = DOCS / 'transformers.md'
RUNS = HERE / 'runs'
FIGURES = DOCS / '_static' / 'transformers'
SETS = ('cpu', 'gpu')

NORM_OF = {'vit': 'LayerNorm', 'vit_dyt': 'DyT', 'vit_nonorm': 'none'}
OPTIMIZER_OF = {'vanilla': 'SGD+momentum', 'bnp': 'BNP+SGD+momentum',
                'adamw': 'AdamW', 'bnp_adamw': 'BNP+AdamW'}
ORDER = [('vit', 'adamw'), ('vit', 'bnp_adamw'), ('vit', 'vanilla'),
         ('vit', 'bnp'), ('vit_nonorm', 'bnp_adamw'), ('vit_dyt', 'adamw'),
         ('vit_nonorm', 'adamw'), ('vit_nonorm', 'bnp'),
         ('vit_dyt', 'vanilla'), ('vit_nonorm', 'vanilla')]
# (title, BNP configuration, configurations it is compared with)
COMPARISONS = (
    ('LayerNorm, AdamW', ('vit', 'bnp_adamw'), [('vit', 'adamw')]),
    ('LayerNorm, SGD+momentum', ('vit', 'bnp'), [('vit', 'vanilla')]),
    ('BNP instead of normalisation, AdamW', ('vit_nonorm', 'bnp_adamw'),
     [('vit_dyt', 'adamw'), ('vit_nonorm', 'adamw'), ('vit', 'adamw')]),
    ('BNP instead of normalisation, SGD+momentum', ('vit_nonorm', 'bnp'),
     [('vit_dyt', 'vanilla'), ('vit_nonorm', 'vanilla'), ('vit', 'vanilla')]),
)


def _select_best(scores):
  # The harness's rule, imported lazily so that --help needs no JAX.
  from bnp_optax import experiments  # pylint: disable=g-import-not-at-top
  return experiments.select_best(scores)


def _diverged(result):
  from bnp_optax import experiments  # pylint: disable=g-import-not-at-top
  return experiments.diverged(result)


def load(run_set: str) -> list[dict]:
  """Every run JSON of a set (``cpu`` or ``gpu``)."""
  root = RUNS / run_set
  if not root.is_dir():
    return []
  return [json.loads(p.read_text()) for p in sorted(root.glob('*/vit*.json'))]


def summarize(results: list[dict]) -> dict:
  """Per (model, method): per rate the seeds' numbers, and the chosen rate."""
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in results:
    c = r['config']
    groups[(c['model'], c['method'])][c['learning_rate']].append(r)
  summary = {}
  for key, by_rate in groups.items():
    scores = {}
    for rate, runs in by_rate.items():
      val = [r['final'].get('validation_accuracy') for r in runs]
      val = [v for v in val if v is not None]
      scores[rate] = (float(np.mean(val)) if val else None,
                      any(_diverged(r) for r in runs))
    best = _select_best(scores)
    summary[key] = {'rates': dict(sorted(scores.items())), 'best': best,
                    'runs': by_rate.get(best, []),
                    'config': next(iter(by_rate.values()))[0]['config']}
  return summary


def _pct(values):
  v = 100 * np.asarray(values, float)
  if not len(v):
    return 'n/a'
  if len(v) == 1:
    return f'{v[0]:.1f}'
  return f'{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})'


def results_table(summary: dict) -> str:
  """Markdown: one row per configuration at its selected rate."""
  if not summary:
    return '*No committed runs.*'
  c = summary.get(('vit', 'adamw'), next(iter(summary.values())))['config']
  lines = ['| normalisation | optimizer | held-out accuracy % per rate '
           '(mean over seeds; bold: selected) | seeds | test accuracy % at the '
           'selected rate, mean (min-max) | final train loss |',
           '| --- | --- | --- | --- | --- | --- |']
  for key in ORDER:
    if key not in summary:
      continue
    s = summary[key]
    rates = []
    for rate, (score, diverged) in s['rates'].items():
      text = 'diverged*' if diverged else (
          'n/a' if score is None else f'{100 * score:.1f}')
      rates.append(f'{rate:g}: ' + (f'**{text}**' if rate == s['best']
                                    else text))
    runs = s['runs']
    test = [r['final']['test_accuracy'] for r in runs]
    loss = [r['final']['train_loss'] for r in runs]
    loss_text = (f'{np.mean(loss):.3f}' if runs and None not in loss
                 else 'n/a')
    lines.append(f'| {NORM_OF[key[0]]} | {OPTIMIZER_OF[key[1]]} | '
                 f'{"; ".join(rates)} | {len(runs)} | {_pct(test)} | '
                 f'{loss_text} |')
  lines.append('')
  lines.append(
      f'ViT (patch 4, width 64, depth 4, 4 heads, MLP 128; '
      f'{c["num_params"]:,} parameters in the {NORM_OF[c["model"]]} ViT), '
      'CIFAR-10, batch '
      f'{c["batch_size"]}, {c["epochs"]} epochs of {c["steps_per_epoch"]} '
      f'steps on {c["num_train"]:,} training images, rate selected on '
      f'{c["num_validation"]:,} held-out images, test on {c["num_test"]:,}; '
      'AdamW with decoupled weight decay 0.05, momentum 0.9. diverged*: '
      "the harness's rule, a non-finite loss or a final training loss above "
      "the untrained network's held-out loss (the rate is then out).")
  return '\n'.join(lines)


def comparison_table(summary: dict) -> str:
  """Markdown: BNP's test accuracy minus each alternative's."""
  if not summary:
    return '*No committed runs.*'
  lines = ['| comparison | BNP configuration, test % | against, test % | '
           'BNP minus it (points) |', '| --- | --- | --- | --- |']

  def mean_test(key):
    runs = summary.get(key, {}).get('runs', [])
    return (100 * float(np.mean([r['final']['test_accuracy'] for r in runs]))
            if runs else math.nan)

  for title, bnp_key, others in COMPARISONS:
    if bnp_key not in summary:
      continue
    ours = mean_test(bnp_key)
    for other in others:
      if other not in summary:
        continue
      theirs = mean_test(other)
      lines.append(
          f'| {title} | {NORM_OF[bnp_key[0]]} + '
          f'{OPTIMIZER_OF[bnp_key[1]]}: {ours:.1f} | {NORM_OF[other[0]]} + '
          f'{OPTIMIZER_OF[other[1]]}: {theirs:.1f} | {ours - theirs:+.1f} |')
  return '\n'.join(lines)


def figure(summary: dict, output: pathlib.Path) -> pathlib.Path | None:
  """Held-out accuracy against the rate, and test accuracy at the chosen."""
  if not summary:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, middle, right) = plt.subplots(
      1, 3, figsize=(14, 4), layout='constrained',
      gridspec_kw={'width_ratios': [1, 1, 1.2]})
  styles = {'vit': '-', 'vit_dyt': ':', 'vit_nonorm': '--'}
  markers = {'vit': 'o', 'vit_dyt': 's', 'vit_nonorm': '^'}
  colours = {'vanilla': 'tab:blue', 'bnp': 'tab:red', 'adamw': 'tab:green',
             'bnp_adamw': 'tab:purple'}
  keys = [k for k in ORDER if k in summary]
  for key in keys:
    s = summary[key]
    ax = left if key[1] in ('vanilla', 'bnp') else middle
    rates = [r for r, (v, d) in s['rates'].items() if v is not None and not d]
    ax.plot(rates, [100 * s['rates'][r][0] for r in rates],
            linestyle=styles[key[0]], color=colours[key[1]],
            marker=markers[key[0]],
            label=f'{NORM_OF[key[0]]}, {OPTIMIZER_OF[key[1]]}')
  grids = collections.defaultdict(set)
  for key in keys:
    grids[key[1] in ('vanilla', 'bnp')].update(summary[key]['rates'])
  for ax, title, sgd in ((left, 'SGD + momentum', True),
                         (middle, 'AdamW', False)):
    ax.set_xscale('log')
    ax.set_xticks(sorted(grids[sgd]), [f'{r:g}' for r in sorted(grids[sgd])])
    ax.minorticks_off()
    ax.set_xlabel('learning rate')
    ax.set_ylabel('held-out accuracy %')
    ax.set_title(title)
    ax.legend(fontsize=7)
  tests = [[100 * r['final']['test_accuracy'] for r in summary[k]['runs']]
           for k in keys]
  y = np.arange(len(keys))
  right.barh(y, [np.mean(t) if t else 0 for t in tests],
             color=[colours[k[1]] for k in keys], alpha=0.7)
  for i, t in enumerate(tests):
    right.plot(t, [i] * len(t), 'k.')
  right.set_yticks(y, [f'{NORM_OF[k[0]]}, {OPTIMIZER_OF[k[1]]}'
                       for k in keys], fontsize=8)
  flat = [v for t in tests for v in t]
  if flat:
    right.set_xlim(max(0.0, min(flat) - 5), max(flat) + 2)
  right.invert_yaxis()
  right.set_xlabel('test accuracy % at the selected rate (dots: seeds)')
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


INPUT_STATS = HERE / 'input_stats_cpu.json'
KINDS = ('patch embedding', 'attention q/k/v', 'attention output',
         'MLP first layer', 'MLP second layer (post-GELU)', 'head')


def input_stats_table() -> str:
  """Markdown: off-centre and scale spread of every projection's inputs."""
  if not INPUT_STATS.exists():
    return '*Not measured.*'
  data = json.loads(INPUT_STATS.read_text())['models']
  models = [m for m in ('vit', 'vit_dyt', 'vit_nonorm') if m in data]
  head = ' | '.join(f'{NORM_OF[m]}: median abs(mean)/std; max/min std'
                    for m in models)
  lines = [f'| projection | {head} |',
           '| --- |' + ' --- |' * len(models)]
  for k in KINDS:
    cells = []
    for m in models:
      v = data[m][k]
      cells.append(f'{v["median_abs_mean_over_std"]:.2f}; '
                   f'{v["std_max_over_min"]:.1f}')
    lines.append(f'| {k} | {" | ".join(cells)} |')
  return '\n'.join(lines)


BENCH = HERE / 'bench_vit_cpu.json'


def cost_table() -> str:
  """Markdown: the step benchmark's ViT case (BNP against its base)."""
  if not BENCH.exists():
    return '*Not measured.*'
  bench = json.loads(BENCH.read_text())
  lines = ['| pair | step time ratio, paired (wall; CPU time) | compile '
           'ratio (wall; CPU time) | peak memory MB (BNP; base) | median '
           'step ms (BNP; base) |', '| --- | --- | --- | --- | --- |']
  for r in bench['results']:
    v = r['variants']
    for pair in ('bnp/sgd', 'bnp_adamw/adamw'):
      if pair not in r['ratios']:
        continue
      a, b = pair.split('/')
      q = r['ratios'][pair]
      mem = [v[n]['memory']['peak_bytes'] / 2**20 if v[n]['memory'] else
             math.nan for n in (a, b)]
      lines.append(
          f'| {a} / {b} (batch {r["batch_size"]}) | {q["paired"]:.3f}; '
          f'{q["paired_cpu"]:.3f} | {q["compile"]:.2f}; '
          f'{q["compile_cpu"]:.2f} | {mem[0]:.1f}; {mem[1]:.1f} | '
          f'{v[a]["median_ms"]:.1f}; {v[b]["median_ms"]:.1f} |')
  d = bench['device']
  lines.append('')
  lines.append(f'{d["platform"]} ({d["cpu_count"]} cores, shared), jax '
               f'{d["jax"]}; {bench["args"]["steps"]} interleaved rounds.')
  return '\n'.join(lines)


def blocks() -> dict[str, str]:
  """The page's generated tables, ``{marker id: markdown}``."""
  out = {'input-stats': input_stats_table(), 'cost': cost_table()}
  for run_set in SETS:
    summary = summarize(load(run_set))
    table = results_table(summary)
    if summary:  # the figure that main() draws from the same runs
      table = (f'![ViT comparison, {run_set} runs](_static/transformers/'
               f'vit-{run_set}.png)\n\n' + table)
    out[f'{run_set}-results'] = table
    out[f'{run_set}-comparison'] = comparison_table(summary)
  return out


def render(page: str, tables: dict[str, str]) -> str:
  """``page`` with the text between each marker pair replaced."""
  for name, text in tables.items():
    pattern = re.compile(
        rf'(<!-- BEGIN numbers {re.escape(name)} -->\n).*?'
        rf'(<!-- END numbers {re.escape(name)} -->)', re.S)
    if not pattern.search(page):
      raise ValueError(f'{PAGE.name}: no markers for {name!r}')
    page = pattern.sub(lambda m, t=text: m.group(1) + t + '\n' + m.group(2),
                       page)
  return page


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='fail if the page differs; write nothing')
  args = parser.parse_args(argv)
  page = PAGE.read_text()
  new = render(page, blocks())
  if args.check:
    if new != page:
      print(f'{PAGE} is out of date: run python docs/transformers/build.py')
      return 1
    return 0
  for run_set in SETS:
    summary = summarize(load(run_set))
    path = figure(summary, FIGURES / f'vit-{run_set}.png')
    if path:
      print(f'wrote {path.relative_to(DOCS.parent)}')
  if new != page:
    PAGE.write_text(new)
    print(f'updated {PAGE.relative_to(DOCS.parent)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
