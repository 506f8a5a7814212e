"""Learning-rate sweeps: each method over a grid, selected on held-out data.

``run`` and ``suite`` take ``--lr-grid``: every method trains at every rate
of its grid and every seed, on the training set minus a held-out validation
split (``--validation-split``, :data:`DEFAULT_VALIDATION_SPLIT` when not
given), and each method's rate is selected by :func:`select_best`:

- the score of a rate is the mean over seeds of the final held-out
  (validation) accuracy; the test set is never read for the selection;
- a rate at which any seed diverged is out, whatever its accuracy: a run
  diverged when a training or validation loss was non-finite, or when its
  final training loss is above the held-out loss of the untrained network
  (it ended worse than it started, e.g. a loss of 1e30 or dead units);
- ties (equal scores) go to the smaller rate;
- a method whose every rate diverged has no best rate.

The runs also evaluate the test set (``test_accuracy`` in their JSON, the
network trained without the held-out split): the summary reports it at the
selected rate, after the selection.
"""

import datetime
import hashlib
import json
import math
from typing import Any

SCHEMA = 'bnp_optax.experiments.sweep/1'
DEFAULT_VALIDATION_SPLIT = 0.1
SELECTION_RULE = (
    'highest mean (over seeds) final accuracy on the held-out validation '
    'split; rates where any seed diverged (a non-finite loss, or a final '
    "training loss above the untrained network's held-out loss) excluded; "
    'ties to the smaller rate; the test set is not used')


class GridError(ValueError):
  """A malformed ``--lr-grid``."""


def _rates(text: str, where: str) -> tuple[float, ...]:
  rates = []
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    try:
      rate = float(item)
    except ValueError:
      raise GridError(f'--lr-grid {where}: {item!r} is not a number') from None
    if not (math.isfinite(rate) and rate > 0):
      raise GridError(f'--lr-grid {where}: rates must be finite and > 0, '
                      f'got {item}')
    if rate in rates:
      raise GridError(f'--lr-grid {where}: rate {item} given twice')
    rates.append(rate)
  if not rates:
    raise GridError(f'--lr-grid {where}: no rates')
  return tuple(sorted(rates))


def parse_grids(texts: list[str], methods: list[str]
                ) -> dict[str, tuple[float, ...]]:
  """The grid of every method from the ``--lr-grid`` flags.

  Args:
    texts: each ``'R1,R2,...'`` (every method without a grid of its own) or
      ``'METHOD:R1,R2,...'`` (that method).
    methods: the methods of the sweep.

  Returns:
    ``{method: sorted rates}`` for every method.

  Raises:
    GridError: a rate that is not a finite number > 0, a repeated rate, an
      empty grid, a method outside ``methods`` or given twice, a method
      left without a grid.
  """
  common, own = None, {}
  for text in texts:
    method, sep, rest = text.partition(':')
    if sep:
      method = method.strip()
      if method not in methods:
        raise GridError(f'--lr-grid {text}: {method!r} is not one of the '
                        f'methods ({", ".join(methods)})')
      if method in own:
        raise GridError(f'--lr-grid: two grids for {method}')
      own[method] = _rates(rest, method)
    else:
      if common is not None:
        raise GridError('--lr-grid: two grids for every method; name the '
                        "method of one (e.g. 'bnp:0.1,1')")
      common = _rates(text, 'for every method')
  missing = [m for m in methods if m not in own and common is None]
  if missing:
    raise GridError(f'--lr-grid: no grid for {", ".join(missing)}')
  return {m: own.get(m, common) for m in methods}


def select_best(scores: dict[float, tuple[float | None, bool]]
                ) -> float | None:
  """The selected rate from ``{rate: (held-out score, diverged)}``.

  Only the held-out scores are passed in: the selection cannot see the test
  set. See the module docstring for the rule.
  """
  candidates = [(score, -rate, rate) for rate, (score, diverged)
                in scores.items()
                if not diverged and score is not None and math.isfinite(score)]
  return max(candidates)[2] if candidates else None


def diverged(result: dict) -> bool:
  """Whether a run diverged: see the module docstring."""
  if result['final']['diverged']:
    return True
  start = result['history'][0].get('validation_loss')
  end = result['final']['train_loss']
  return start is not None and end is not None and end > start


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def summarize(results: list[dict], grids: dict[str, tuple[float, ...]]
              ) -> dict[str, Any]:
  """The sweep's summary (JSON-ready) from its run results.

  Args:
    results: the run JSONs of the sweep (every method, rate and seed), each
      with a validation split.
    grids: ``{method: rates}``.

  Returns:
    The summary: per method, per rate the held-out accuracies and the
    divergence, the selected rate, and the test accuracy at that rate.

  Raises:
    ValueError: a run without held-out accuracy, or a grid point without
      runs.
  """
  runs = {}
  for r in results:
    if 'validation_accuracy' not in r['final']:
      raise ValueError(f'{r["name"]}: no held-out (validation) accuracy; '
                       'a sweep needs --validation-split')
    c = r['config']
    runs.setdefault((c['method'], float(c['learning_rate'])), []).append(r)
  methods = {}
  for method, grid in grids.items():
    rows = []
    for rate in grid:
      group = sorted(runs.get((method, float(rate)), []),
                     key=lambda r: r['config']['seed'])
      if not group:
        raise ValueError(f'no run of {method} at learning rate {rate}')
      finals = [r['final'] for r in group]
      failed = [r['config']['seed'] for r in group if diverged(r)]
      rows.append(dict(
          learning_rate=rate, seeds=[r['config']['seed'] for r in group],
          runs=[r['name'] for r in group],
          validation_accuracy=[f['validation_accuracy'] for f in finals],
          validation_accuracy_mean=_mean(
              [f['validation_accuracy'] for f in finals]),
          train_loss=[f['train_loss'] for f in finals],
          train_loss_mean=_mean([f['train_loss'] for f in finals]),
          diverged=bool(failed), diverged_seeds=failed,
          test_accuracy=[f['test_accuracy'] for f in finals],
          test_accuracy_mean=_mean([f['test_accuracy'] for f in finals])))
    best = select_best({row['learning_rate']: (
        row['validation_accuracy_mean'], row['diverged']) for row in rows})
    best_row = next((row for row in rows if row['learning_rate'] == best),
                    None)
    methods[method] = dict(grid=list(grid), rows=rows,
                           best_learning_rate=best, best=best_row)
  first = results[0]['config']
  common = {k: v for k, v in first.items()
            if k not in ('method', 'learning_rate', 'seed',
                         'learning_rate_source', 'method_label', 'norm',
                         'bnp', 'num_params')}
  return dict(
      schema=SCHEMA,
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      selection=SELECTION_RULE, validation_split=first['validation_split'],
      num_validation=first.get('num_validation'),
      seeds=sorted({r['config']['seed'] for r in results}),
      config=common, methods=methods)


def summary_name(summary: dict) -> str:
  """File stem of the summary: setting and a hash of the sweep's identity."""
  c = summary['config']
  identity = dict(config={k: v for k, v in c.items() if not k.startswith(
      ('num_', 'data_source', 'input_shape', 'steps_per', 'resolved_'))},
                  seeds=summary['seeds'],
                  grids={m: v['grid'] for m, v in summary['methods'].items()})
  text = json.dumps(identity, sort_keys=True, separators=(',', ':'))
  digest = hashlib.sha256(text.encode()).hexdigest()[:10]
  return f'sweep-{c["model"]}-{c["dataset"]}-bs{c["batch_size"]}-{digest}'


def _pct(value):
  return '-' if value is None else f'{100 * value:.2f}'


def format_table(summary: dict) -> str:
  """The printed table: per method, held-out accuracy per rate, best rate."""
  c = summary['config']
  rates = sorted({rate for m in summary['methods'].values()
                  for rate in m['grid']})
  n_seeds = len(summary['seeds'])
  lines = [
      f'learning-rate sweep: {c["model"]} {c["dataset"]} bs'
      f'{c["batch_size"]} {c["optimizer"]}, {c["epochs"]} epoch(s), '
      f'{n_seeds} seed(s); held-out validation split '
      f'{summary["validation_split"]:g} ({summary["num_validation"]} '
      'training examples, not trained on)',
      f'selection: {summary["selection"]}',
      'held-out accuracy (%, mean over seeds; "div": diverged) per rate:']
  width = max(8, *(len(f'{r:g}') for r in rates))
  header = f'{"method":<10}' + ''.join(f'{r:>{width + 1}g}' for r in rates)
  header += f'{"best lr":>9} {"held-out %":>10} {"test %":>8}'
  lines.append(header)
  for method, m in summary['methods'].items():
    cells = []
    by_rate = {row['learning_rate']: row for row in m['rows']}
    for rate in rates:
      row = by_rate.get(rate)
      cell = ('' if row is None else 'div' if row['diverged']
              else _pct(row['validation_accuracy_mean']))
      cells.append(f'{cell:>{width + 1}}')
    best = m['best']
    tail = (f'{"none":>9} {"-":>10} {"-":>8}' if best is None else
            f'{m["best_learning_rate"]:>9g} '
            f'{_pct(best["validation_accuracy_mean"]):>10} '
            f'{_pct(best["test_accuracy_mean"]):>8}')
    lines.append(f'{method:<10}' + ''.join(cells) + tail)
  lines.append('test %: the test set accuracy of the same runs at the '
               'selected rate (reported after the selection, never used by '
               'it)')
  return '\n'.join(lines)
