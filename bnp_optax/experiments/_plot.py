"""Figures like the paper's Figures 3-6, rebuilt from run JSON files.

One panel per (model, dataset, batch size). Runs are grouped by their full
configuration except the seed (:func:`group_results`): in each panel, one
curve per configuration, test accuracy solid (left axis) and training loss
dashed (right axis), markers at the evaluation points, the mean over seeds
as a line and the range (min to max over seeds) as a shaded band.
Configurations of one panel that differ in more than the method show the
differing fields in the legend. Two results of one configuration and one
seed are an error, never averaged.
"""

import collections
import json
import pathlib
from typing import Any

import numpy as np

from bnp_optax.experiments import _config
from bnp_optax.experiments import _deps
from bnp_optax.experiments import _methods

_CYCLE = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b',
          '#e377c2', '#7f7f7f', '#bcbd22', '#17becf')
# Fields shown as the panel (model, dataset, batch size), the curve
# (method) or not at all (seed) rather than in the legend.
_NOT_IN_LEGEND = ('model', 'dataset', 'batch_size', 'method', 'seed',
                  'identity_version')
_SHORT = {'learning_rate': 'lr', 'train_subset': 'n_train',
          'test_subset': 'n_test', 'weight_decay': 'wd'}


def _series(runs, key):
  """Common x and the (seeds, points) matrix of ``key`` (NaN for None)."""
  length = min(len(r['history']) for r in runs)
  x = np.array([p['epoch'] for p in runs[0]['history'][:length]])
  y = np.array([[np.nan if p[key] is None else p[key]
                 for p in r['history'][:length]] for r in runs], float)
  return x, y


def _identity(run) -> dict:
  return _config.identity_of(run['config'], complete=True)


def group_results(results):
  """``{(model, dataset, batch size): {config hash: [runs]}}``.

  Runs share a group when their configurations are identical but for the
  seed, so different learning rates, epochs or any other field are never
  averaged together.

  Raises:
    ValueError: two runs of one configuration with the same seed.
  """
  panels = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in results:
    c = r['config']
    group = panels[(c['model'], c['dataset'], c['batch_size'])][r['group']]
    for other in group:
      if other['config']['seed'] == c['seed']:
        raise ValueError(
            f'two results of one configuration with seed {c["seed"]}: '
            f'{other.get("_path", other["name"])} and '
            f'{r.get("_path", r["name"])}; remove one')
    group.append(r)
  return panels


def _differing(groups) -> list[str]:
  """Identity fields (besides panel, method, seed) that differ among groups.

  A field at its method's own default (``optimizer``, the bn4 fields; see
  ``_config.method_defaults``) counts as the same as another method's
  default: BN with 4 Things' Adam is not a difference of the configuration.
  """
  identities = [_at_method_defaults(_identity(runs[0]))
                for runs in groups.values()]
  return [k for k in _config.IDENTITY_FIELDS if k not in _NOT_IN_LEGEND
          and len({json.dumps(i[k]) for i in identities}) > 1]


def _at_method_defaults(identity: dict) -> dict:
  if identity.get('method') not in _methods.METHODS:
    return identity
  defaults = _config.method_defaults(identity['method'])
  return {k: '<method default>' if k in defaults and v == defaults[k] else v
          for k, v in identity.items()}


def _describe(run, fields) -> str:
  ident = _identity(run)
  parts = []
  for k in fields:
    v = ident[k]
    v = 'none' if v is None else f'{v:g}' if isinstance(v, float) else v
    parts.append(f'{_SHORT.get(k, k)}={v}')
  return ', '.join(parts)


def sorted_groups(groups):
  """The configurations of one panel in the order of figures and tables.

  Args:
    groups: ``{config hash: [runs]}``, one panel of :func:`group_results`.

  Returns:
    ``[(config hash, runs)]`` in the order of the method table, then by
    configuration.
  """
  order = list(_methods.METHODS)

  def key(item):
    runs = item[1]
    method = runs[0]['config']['method']
    return (order.index(method) if method in order else len(order),
            json.dumps(_identity(runs[0]), sort_keys=True))

  return sorted(groups.items(), key=key)


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

  Raises:
    ValueError: two results of one configuration with the same seed.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _deps.MissingDependency('matplotlib', 'plotting') from e
  matplotlib.use('Agg')
  # pylint: disable=g-import-not-at-top
  import matplotlib.lines
  import matplotlib.patches
  import matplotlib.pyplot as plt

  panels = group_results(results)
  keys = sorted(panels)
  fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 5.6),
                           squeeze=False)
  for ax, key in zip(axes[0], keys):
    loss_ax = ax.twinx()
    groups = panels[key]
    fields = _differing(groups)
    methods = [runs[0]['config']['method'] for runs in groups.values()]
    by_method = len(set(methods)) == len(methods)
    acc_range = []  # Accuracies after epoch 0, to zoom the axis on them.
    acc_all = []
    x_all = []
    handles = []
    for i, (_, runs) in enumerate(sorted_groups(groups)):
      config = runs[0]['config']
      method = _methods.METHODS.get(config['method'])
      colour = ((method and method.colour) or _CYCLE[i % len(_CYCLE)]
                if by_method else _CYCLE[i % len(_CYCLE)])
      label = config.get('method_label', config['method'])
      extra = _describe(runs[0], fields)
      seeds = sorted(r['config']['seed'] for r in runs)
      label += (f' ({extra}; ' if extra else ' (') + (
          f'lr {config["learning_rate"]:g}, ' if 'learning_rate' not in fields
          else '') + (f'{len(runs)} seeds)' if len(runs) > 1
                      else f'seed {seeds[0]})')
      x, acc = _series(runs, 'test_accuracy')
      acc = 100 * acc
      x_all += list(x)
      line, = ax.plot(x, np.nanmean(acc, 0), '-', marker='o', markersize=3,
                      color=colour, label=label)
      handles.append(line)
      acc_range += [v for v in acc[:, x > 0].ravel() if np.isfinite(v)]
      acc_all += [v for v in acc.ravel() if np.isfinite(v)]
      if len(runs) > 1:
        ax.fill_between(x, np.nanmin(acc, 0), np.nanmax(acc, 0),
                        color=colour, alpha=0.2, linewidth=0)
      x, loss = _series(runs, 'train_loss')
      keep = ~np.all(np.isnan(loss), 0)
      if keep.any():
        with np.errstate(all='ignore'):
          mean = np.nanmean(loss[:, keep], 0)
        # Markers: a run with one evaluation still shows its loss.
        loss_ax.plot(x[keep], mean, '--', marker='s', markersize=3,
                     color=colour)
        if len(runs) > 1:
          loss_ax.fill_between(x[keep], np.nanmin(loss[:, keep], 0),
                               np.nanmax(loss[:, keep], 0), color=colour,
                               alpha=0.12, linewidth=0)
    handles += [
        matplotlib.lines.Line2D([], [], color='k', ls='-', marker='o',
                                markersize=3, label='test accuracy (left)'),
        matplotlib.lines.Line2D([], [], color='k', ls='--', marker='s',
                                markersize=3,
                                label='training loss (right, mean since the '
                                'previous point)'),
        matplotlib.patches.Patch(color='k', alpha=0.2,
                                 label='band: min to max over seeds; line: '
                                 'mean'),
    ]
    model, dataset, bs = key
    ax.set_title(f'{model}, {dataset}, batch size {bs}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test accuracy (%)')
    loss_ax.set_ylabel('training loss')
    if loss_log_scale:
      loss_ax.set_yscale('log')
    # A diverged run would squash the others: losses above the cap are
    # off the chart (their values are in the JSON and the summary table).
    bottom, top = loss_ax.get_ylim()
    loss_ax.set_ylim(bottom, min(top, loss_cap))
    lo_x, hi_x = min(x_all), max(x_all)
    pad = 0.02 * (hi_x - lo_x) if hi_x > lo_x else 0.05
    ax.set_xlim(lo_x - pad, hi_x + pad)  # Where the data is, not from 0.
    limits = accuracy_limits(acc_all, acc_range, len(set(x_all)))
    if limits is not None:
      ax.set_ylim(*limits)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc='upper center',
              bbox_to_anchor=(0.5, -0.12), ncol=1, fontsize=8,
              frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


# Curves with at most this many evaluations show every point, the untrained
# network's (epoch 0) included; longer ones zoom on the accuracies after
# epoch 0, where the methods differ.
SHOW_ALL_POINTS_UP_TO = 12


def accuracy_limits(all_values, after_start, num_points):
  """The accuracy axis' limits (%), or None when there is nothing to show.

  Args:
    all_values: every finite accuracy plotted (%).
    after_start: those after epoch 0.
    num_points: how many evaluations the curves have (distinct epochs).

  Example:
    >>> accuracy_limits([10.0, 80.0, 90.0], [80.0, 90.0], 3)
    (5.5, 94.5)
  """
  values = (all_values if num_points <= SHOW_ALL_POINTS_UP_TO
            or not after_start else after_start)
  if not values:
    return None
  lo, hi = min(values), max(values)
  return (max(0.0, lo - 0.05 * (hi - lo) - 0.5),
          min(100.0, hi + 0.05 * (hi - lo) + 0.5))


def summary_rows(results) -> list[dict[str, Any]]:
  """One row per configuration (over its seeds): final loss and accuracy.

  The numbers unrounded, for a CSV; :func:`summary_table` formats them.

  Raises:
    ValueError: two results of one configuration with the same seed.
  """
  rows = []
  for (model, dataset, bs), groups in sorted(group_results(results).items()):
    fields = _differing(groups)
    for group, runs in sorted_groups(groups):
      losses = [r['final']['train_loss'] for r in runs]
      losses = [np.nan if v is None else v for v in losses]
      accs = 100 * np.array([r['final']['test_accuracy'] for r in runs])
      described = _describe(runs[0], [f for f in fields
                                       if f != 'learning_rate'])
      config = runs[0]['config']
      rows.append(dict(
          model=model, dataset=dataset, batch_size=bs,
          method=config['method'], learning_rate=config['learning_rate'],
          optimizer=config.get('optimizer'), epochs=config.get('epochs'),
          seeds=len(runs), train_loss_mean=float(np.mean(losses)),
          test_accuracy_mean=float(accs.mean()),
          test_accuracy_min=float(accs.min()),
          test_accuracy_max=float(accs.max()),
          time_per_run_s=float(np.mean([r['timing']['total_s']
                                        for r in runs])),
          config=group, differs=described))
  return rows


def summary_table(results) -> str:
  """A plain-text table: final loss and accuracy per configuration.

  One row per configuration (over its seeds); the ``config`` column lists
  the fields in which the configurations of one panel differ besides the
  method, and the configuration's hash (the file names hold it).

  Raises:
    ValueError: two results of one configuration with the same seed.
  """
  rows = [('model', 'dataset', 'bs', 'method', 'lr', 'seeds', 'train loss',
           'test acc (mean, min-max)', 'time/run', 'config')]
  for r in summary_rows(results):
    rows.append((
        r['model'], r['dataset'], str(r['batch_size']), r['method'],
        f'{r["learning_rate"]:g}', str(r['seeds']),
        f'{r["train_loss_mean"]:.4g}',
        f'{r["test_accuracy_mean"]:.2f}% ({r["test_accuracy_min"]:.2f}-'
        f'{r["test_accuracy_max"]:.2f})',
        f'{r["time_per_run_s"]:.1f}s', f'{r["config"]} {r["differs"]}'.strip()))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
           for r in rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def write_summary_csv(results, path) -> pathlib.Path:
  """Writes :func:`summary_rows` as CSV (one header line) to ``path``."""
  import csv  # pylint: disable=g-import-not-at-top

  rows = summary_rows(results)
  path = pathlib.Path(path)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path


_KAPPAS = (
    ('kappa(H^T S H)', lambda r: r['kappa_hessian']),
    ('kappa(P^T H^T S H P)', lambda r: r['kappa_preconditioned']),
    ('kappa(P_batch^T H^T S H P_batch)',
     lambda r: r['kappa_preconditioned_batch']),
    ('kappa(D)', lambda r: r['kappa_d']),
    ('kappa(D)^2', lambda r: r['kappa_d'] ** 2),
    ('improvement kappa_H / kappa_PHP',
     lambda r: r['kappa_hessian'] / r['kappa_preconditioned']),
    ('improvement / kappa(D)^2', lambda r: r['kappa_hessian'] / r[
        'kappa_preconditioned'] / r['kappa_d'] ** 2),
    ('eps=0: kappa(P^T H^T S H P)',
     lambda r: r['kappa_preconditioned_eps0']),
    ('eps=0: kappa(D)', lambda r: r['kappa_d_eps0']),
    ('eps=0: improvement',
     lambda r: r['kappa_hessian'] / r['kappa_preconditioned_eps0']),
    ('eps=0: improvement / kappa(D)^2', lambda r: r['kappa_hessian'] / r[
        'kappa_preconditioned_eps0'] / r['kappa_d_eps0'] ** 2),
)


def conditioning_series(result) -> dict[str, np.ndarray]:
  """Figure 8's per-step series of a run with ``conditioning_every``."""
  rows = result['conditioning']
  series = {k: np.array([r[k] for r in rows], float) for k in rows[0]}
  series['improvement'] = (series['kappa_hessian']
                           / series['kappa_preconditioned'])
  return series


def conditioning_summary(result) -> str:
  """Percentiles over the steps of Figure 8's condition numbers."""
  rows = result['conditioning']
  ranks = [r['rank'] for r in rows]
  lines = [f'{result["name"]}: {len(rows)} steps with condition numbers; '
           f'rank of the Hessian: median {np.median(ranks):.0f} (of '
           f'{rows[0]["size"]})']
  for name, fn in _KAPPAS:
    v = np.array([fn(r) for r in rows], float)
    q = np.percentile(v, [5, 50, 95])
    lines.append(f'{name:34s} 5%: {q[0]:10.3g}  median: {q[1]:10.3g}  '
                 f'95%: {q[2]:10.3g}')
  s = conditioning_series(result)
  ratio = np.log10(s['improvement']) / np.log10(s['kappa_d'] ** 2)
  lines.append(f'log10(improvement) / log10(kappa(D)^2): median '
               f'{np.nanmedian(ratio):.2f}')
  return '\n'.join(lines)


def plot_conditioning(result, output) -> pathlib.Path:
  """Figure 8: condition numbers per step, with and without BNP."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _deps.MissingDependency('matplotlib', 'plotting') from e
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  s = conditioning_series(result)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax1.semilogy(s['step'], s['kappa_hessian'], lw=0.5, label='Hessian')
  ax1.semilogy(s['step'], s['kappa_preconditioned'], lw=0.5,
               label='BNP preconditioned')
  ax1.set_xlabel('iteration')
  ax1.set_ylabel('condition number')
  ax1.legend()
  ax2.semilogy(s['step'], s['kappa_d'], lw=0.5, label='kappa(D)')
  ax2.semilogy(s['step'], s['improvement'], lw=0.5,
               label='kappa_H / kappa_PHP')
  ax2.set_xlabel('iteration')
  ax2.legend()
  for ax in (ax1, ax2):
    ax.set_xlim(s['step'].min(), max(s['step'].max(), s['step'].min() + 1))
  fig.suptitle(result['name'], fontsize=9)
  fig.tight_layout()
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=120)
  plt.close(fig)
  return output
