"""Figures like the paper's Figures 3-6, rebuilt from run JSON files.

One panel per (model, dataset, batch size); in each, one colour per method,
test accuracy solid (left axis), training loss dashed (right axis), the mean
over seeds as a line and the range (min to max) as a shaded band.
"""

import collections
import json
import pathlib

import numpy as np

from bnp_optax.experiments import _methods
from bnp_optax.experiments import _train

_COLOURS = {
    'vanilla': '#1f77b4', 'bn': '#d62728', 'renorm': '#9467bd',
    'ln': '#2ca02c', 'gn': '#8c564b', 'bnp': '#ff7f0e', 'bnp_gn': '#e377c2',
}


def load_results(paths) -> list[dict]:
  """Reads run JSONs from files and directories (searched recursively)."""
  files = []
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      files += sorted(p.rglob('*.json'))
    elif p.is_file():
      files.append(p)
    else:
      raise FileNotFoundError(f'no such file or directory: {p}')
  results = []
  for f in files:
    with open(f) as fh:
      try:
        result = json.load(fh)
      except json.JSONDecodeError as e:
        raise ValueError(f'{f}: not JSON ({e})') from e
    if isinstance(result, dict) and result.get('schema') == _train.SCHEMA:
      _train.check_result(result)
      results.append(result)
  if not results:
    raise ValueError(f'no run results ({_train.SCHEMA}) in {list(paths)}')
  return results


def _series(runs, key):
  """Common x and the (seeds, points) matrix of ``key`` (NaN for None)."""
  length = min(len(r['history']) for r in runs)
  x = np.array([p['epoch'] for p in runs[0]['history'][:length]])
  y = np.array([[np.nan if p[key] is None else p[key]
                 for p in r['history'][:length]] for r in runs], float)
  return x, y


def group_results(results):
  """``{(model, dataset, batch size): {method: [runs]}}``."""
  panels = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in results:
    c = r['config']
    panels[(c['model'], c['dataset'], c['batch_size'])][c['method']].append(r)
  return panels


def plot(results, output, *, title: str | None = None,
         loss_log_scale: bool = True, loss_cap: float = 10.0) -> pathlib.Path:
  """Writes the figure of ``results`` to ``output`` (PNG) and returns it.

  Args:
    results: run results (dicts as written by ``run``).
    output: the PNG path.
    title: figure title.
    loss_log_scale: training loss on a log scale.
    loss_cap: upper limit of the loss axis (diverged runs go off the chart).

  Returns:
    The path written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = group_results(results)
  keys = sorted(panels)
  fig, axes = plt.subplots(1, len(keys), figsize=(6.0 * len(keys), 5.2),
                           squeeze=False)
  order = list(_methods.METHODS)
  for ax, key in zip(axes[0], keys):
    loss_ax = ax.twinx()
    acc_range = []  # Accuracies after epoch 0, to zoom the axis on them.
    methods = sorted(panels[key], key=lambda m: order.index(m)
                     if m in order else len(order))
    for method in methods:
      runs = panels[key][method]
      colour = _COLOURS.get(method, None)
      label = runs[0]['config'].get('method_label', method)
      lr = runs[0]['config']['learning_rate']
      label = f'{label} (lr {lr:g}, {len(runs)} seed{"s" * (len(runs) > 1)})'
      x, acc = _series(runs, 'test_accuracy')
      acc = 100 * acc
      ax.plot(x, np.nanmean(acc, 0), '-', color=colour, label=label)
      acc_range += [v for v in acc[:, x > 0].ravel() if np.isfinite(v)]
      ax.fill_between(x, np.nanmin(acc, 0), np.nanmax(acc, 0), color=colour,
                      alpha=0.2, linewidth=0)
      x, loss = _series(runs, 'train_loss')
      keep = ~np.all(np.isnan(loss), 0)
      if keep.any():
        with np.errstate(all='ignore'):
          mean = np.nanmean(loss[:, keep], 0)
        loss_ax.plot(x[keep], mean, '--', color=colour)
        loss_ax.fill_between(x[keep], np.nanmin(loss[:, keep], 0),
                             np.nanmax(loss[:, keep], 0), color=colour,
                             alpha=0.12, linewidth=0)
    model, dataset, bs = key
    ax.set_title(f'{model}, {dataset}, batch size {bs}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy (%), solid')
    loss_ax.set_ylabel('training loss, dashed')
    if loss_log_scale:
      loss_ax.set_yscale('log')
    # A diverged run would squash the others: losses above the cap are
    # off the chart (their values are in the JSON and the summary table).
    bottom, top = loss_ax.get_ylim()
    loss_ax.set_ylim(bottom, min(top, loss_cap))
    if acc_range:
      lo, hi = min(acc_range), max(acc_range)
      ax.set_ylim(max(0.0, lo - 0.1 * (hi - lo) - 0.5),
                  min(100.0, hi + 0.05 * (hi - lo) + 0.5))
    ax.grid(alpha=0.3)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.13), ncol=2,
              fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


def summary_table(results) -> str:
  """A plain-text table: final loss and accuracy per method (over seeds)."""
  rows = [('model', 'dataset', 'bs', 'method', 'lr', 'seeds', 'train loss',
           'test acc (mean, min-max)', 'time/run')]
  for (model, dataset, bs), methods in sorted(group_results(results).items()):
    order = list(_methods.METHODS)
    for method in sorted(methods, key=lambda m: order.index(m)
                         if m in order else len(order)):
      runs = methods[method]
      losses = [r['final']['train_loss'] for r in runs]
      losses = [np.nan if v is None else v for v in losses]
      accs = 100 * np.array([r['final']['test_accuracy'] for r in runs])
      secs = np.mean([r['timing']['total_s'] for r in runs])
      rows.append((
          model, dataset, str(bs), method,
          f'{runs[0]["config"]["learning_rate"]:g}', str(len(runs)),
          f'{np.mean(losses):.4g}',
          f'{accs.mean():.2f}% ({accs.min():.2f}-{accs.max():.2f})',
          f'{secs:.1f}s'))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)
