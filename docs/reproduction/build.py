"""Rebuilds the reproduction report's figures and numbers from its runs.

``docs/reproduction.md`` holds, for every experiment of the paper's Section
5, a figure and a table of numbers made from the run JSON files committed
under ``docs/reproduction/runs/<suite>/`` (written by
``python -m bnp_optax.experiments suite <suite> --out docs/reproduction/runs``)
and, for Table 1, from a benchmark JSON. This script redraws the figures
(``docs/_static/reproduction/*.png``) and rewrites the tables between the
page's ``<!-- BEGIN numbers ID -->`` and ``<!-- END numbers ID -->``
markers, offline and without training. ``--check`` rewrites nothing and
fails if the page's tables differ from what the committed JSON gives (the
test suite runs it).

Usage::

  python docs/reproduction/build.py          # figures and tables
  python docs/reproduction/build.py --check  # tables up to date?
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
PAGE = DOCS / 'reproduction.md'
RUNS = HERE / 'runs'
FIGURES = DOCS / '_static' / 'reproduction'
TABLE1_JSON = HERE / 'table1_cpu.json'

# The paper's Table 1 (seconds per epoch, V100; Figure 8's network).
PAPER_TABLE1 = {16: (16.08, 16.69), 256: (10.81, 10.70), 512: (10.67, 10.57)}
CIFAR10_TRAIN = 50_000


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One row of the report: the suites whose runs make its figure."""

  id: str
  suites: tuple[str, ...]
  title: str


EXPERIMENTS = (
    Experiment('fig3-mnist', ('fig3-mnist',), 'Figure 3 left'),
    Experiment('fig3-cifar10', ('fig3-cifar10',), 'Figure 3 right'),
    Experiment('fig4-left', ('fig4-fc-bs6',), 'Figure 4 left'),
    Experiment('fig4-right-fc', ('fig4-fc-bs1',), 'Figure 4 right (FC)'),
    Experiment('fig4-right-cnn', ('fig4-cnn-bs1',), 'Figure 4 right (CNN)'),
    Experiment('fig5-left', ('fig5-bs128',), 'Figure 5 left'),
    Experiment('fig5-right', ('fig5-bs2',), 'Figure 5 right'),
    Experiment('fig6-left', ('fig6-resnet110',), 'Figure 6 left'),
    Experiment('fig6-right', ('fig6-preact',), 'Figure 6 right'),
    Experiment('fig8', ('fig8',), 'Figure 8'),
)


def _fmt_range(values, scale=1.0, digits=2, suffix=''):
  v = scale * np.asarray(values, float)
  if np.all(np.isnan(v)):
    return 'n/a'
  if len(v) == 1:
    return f'{v[0]:.{digits}f}{suffix}'
  return (f'{np.nanmean(v):.{digits}f}{suffix} ({np.nanmin(v):.{digits}f}'
          f'-{np.nanmax(v):.{digits}f})')


def _fmt_loss(values):
  v = np.array([np.nan if x is None else x for x in values], float)
  if np.all(np.isnan(v)):
    return 'n/a'
  if len(v) == 1:
    return f'{v[0]:.4g}'
  return f'{np.nanmean(v):.4g} ({np.nanmin(v):.4g}-{np.nanmax(v):.4g})'


def runs_of(experiment: Experiment) -> list[dict]:
  """The committed results of an experiment's suites (may be empty)."""
  dirs = [RUNS / s for s in experiment.suites if (RUNS / s).is_dir()]
  dirs = [d for d in dirs if any(d.glob('*.json'))]
  return experiments.load_results(dirs) if dirs else []


def numbers_table(results: list[dict]) -> str:
  """Markdown: one row per configuration (method) with its final numbers."""
  if not results:
    return '*No committed runs.*'
  lines = ['| method | optimizer, lr | epochs | train examples | seeds | '
           'final train loss, mean (min-max) | test accuracy %, mean '
           '(min-max) | diverged |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for (model, dataset, bs), groups in sorted(
      experiments.group_results(results).items()):
    for _, runs in experiments.sorted_groups(groups):
      c = runs[0]['config']
      losses = [r['final']['train_loss'] for r in runs]
      accs = [r['final']['test_accuracy'] for r in runs]
      diverged = sum(bool(r['final']['diverged']) for r in runs)
      extra = []
      if c.get('resnet_blocks'):
        extra.append(f'{c["resnet_blocks"]} blocks/stage')
      label = c.get('method_label', c['method'])
      several = len(experiments.group_results(results)) > 1
      head = f'{label}' + (f' ({model}, {dataset}, bs {bs})' if several
                           else '')
      subset = ' (subset)' if c.get('train_subset') else ''
      lines.append(
          f'| {head} | {c["optimizer"]}, {c["learning_rate"]:g} | '
          f'{c["epochs"]} | {c["num_train"]}{subset}'
          f'{" (" + ", ".join(extra) + ")" if extra else ""} | {len(runs)} | '
          f'{_fmt_loss(losses)} | {_fmt_range(accs, 100)} | {diverged} |')
  return '\n'.join(lines)


def conditioning_table(results: list[dict]) -> str:
  """Markdown: Figure 8's condition numbers (percentiles over steps)."""
  rows = [r for r in results if r.get('conditioning')]
  if not rows:
    return ''
  lines = ['| quantity | 5% | median | 95% |', '| --- | --- | --- | --- |']
  for result in rows:
    s = experiments.conditioning_series(result)
    quantities = [
        ('kappa(H) of the output neuron', s['kappa_hessian']),
        ('kappa(P^T H P), BNP-preconditioned', s['kappa_preconditioned']),
        ('kappa(D)', s['kappa_d']),
        ('kappa(D)^2', s['kappa_d'] ** 2),
        ('improvement kappa(H) / kappa(P^T H P)', s['improvement']),
        ('kappa(D) with eps1 = eps2 = 0', s['kappa_d_eps0']),
        ('improvement with eps1 = eps2 = 0',
         s['kappa_hessian'] / s['kappa_preconditioned_eps0']),
    ]
    for name, v in quantities:
      q = np.nanpercentile(v, [5, 50, 95])
      lines.append(f'| {name} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} |')
    ratio = np.log10(s['improvement']) / np.log10(s['kappa_d'] ** 2)
    lines.append(f'| log10(improvement) / log10(kappa(D)^2) | '
                 f'{np.nanpercentile(ratio, 5):.2f} | '
                 f'{np.nanmedian(ratio):.2f} | '
                 f'{np.nanpercentile(ratio, 95):.2f} |')
  return '\n'.join(lines)


def _pair(ratio: dict) -> str:
  cpu = ratio.get('paired_cpu')
  return f'{ratio["paired"]:.3f}' + (f'; {cpu:.3f}' if cpu else '')


def table1_table() -> str:
  """Markdown: Table 1 next to our per-epoch times from the benchmark."""
  if not TABLE1_JSON.exists():
    return '*No committed benchmark.*'
  bench = json.loads(TABLE1_JSON.read_text())
  device = bench.get('device', {})
  lines = ['| batch | paper BN s/epoch | paper BNP s/epoch | paper BNP/BN | '
           'ours BN s/epoch | ours BNP s/epoch | ours BNP/BN (paired; CPU '
           'time) | ours BNP/SGD (paired; CPU time) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in sorted(bench['results'], key=lambda r: r['batch_size']):
    bs = r['batch_size']
    steps = math.ceil(CIFAR10_TRAIN / bs)
    bn = r['variants']['bn']['median_ms'] * steps / 1e3
    bnp = r['variants']['bnp']['median_ms'] * steps / 1e3
    p_bn, p_bnp = PAPER_TABLE1.get(bs, (math.nan, math.nan))
    lines.append(
        f'| {bs} | {p_bn:.2f} | {p_bnp:.2f} | {p_bnp / p_bn:.3f} | '
        f'{bn:.2f} | {bnp:.2f} | {_pair(r["ratios"]["bnp/bn"])} | '
        f'{_pair(r["ratios"]["bnp/sgd"])} |')
  lines.append('')
  lines.append(f'Ours: {device.get("platform", "?")} '
               f'({device.get("device_kind", "?")}), '
               f'{device.get("cpu_count", "?")} CPU cores, jax '
               f'{device.get("jax", "?")}; training steps only (the '
               'median step time times the steps of one CIFAR-10 epoch), '
               'no data loading.')
  return '\n'.join(lines)


def table1_figure(output: pathlib.Path) -> pathlib.Path | None:
  """Bars: BNP's time per epoch over BN's, the paper's and ours."""
  if not TABLE1_JSON.exists():
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  bench = json.loads(TABLE1_JSON.read_text())
  rows = sorted(bench['results'], key=lambda r: r['batch_size'])
  sizes = [r['batch_size'] for r in rows]
  paper = [PAPER_TABLE1[b][1] / PAPER_TABLE1[b][0] for b in sizes]
  ours = [r['ratios']['bnp/bn']['paired'] for r in rows]
  x = np.arange(len(sizes))
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.bar(x - 0.2, paper, 0.4, label='paper (V100, per epoch)')
  ax.bar(x + 0.2, ours, 0.4, label='ours (CPU, per step, paired)')
  ax.axhline(1.0, color='k', lw=0.8)
  ax.set_xticks(x, [f'batch {b}' for b in sizes])
  ax.set_ylabel('BNP time / BN time')
  ax.set_title("Table 1: Figure 8's network on CIFAR-10")
  ax.legend(fontsize=8)
  fig.tight_layout()
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


def blocks() -> dict[str, str]:
  """Every generated block of the page, by marker id."""
  out = {}
  for e in EXPERIMENTS:
    results = runs_of(e)
    out[e.id] = numbers_table(results)
    if e.id == 'fig8':
      table = conditioning_table(results)
      if table:
        out['fig8-conditioning'] = table
  out['table1'] = table1_table()
  return out


def figures() -> list[pathlib.Path]:
  """Redraws every experiment's figure from its committed runs."""
  written = []
  for e in EXPERIMENTS:
    results = runs_of(e)
    if not results:
      continue
    written.append(experiments.plot(results, FIGURES / f'{e.id}.png',
                              title=f'{e.title} (bnp_optax)'))
    for r in results:
      if r.get('conditioning'):
        written.append(experiments.plot_conditioning(
            r, FIGURES / f'{e.id}-conditioning.png'))
  table1 = table1_figure(FIGURES / 'table1.png')
  return written + ([table1] if table1 else [])


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
    for path in figures():
      print(f'wrote {path}')
  print(f'wrote {PAGE}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
