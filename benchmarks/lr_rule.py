"""BNP's learning rate for users coming from SGD (docs/howto/learning_rate.md).

Two commands, neither of which trains:

``python benchmarks/lr_rule.py q2 [--data-dir DATA]``
  ``q^2`` of every layer of Flax's MNIST CNN (the harness model
  ``flax_mnist_cnn``) at batch size 128, computed by the code path
  ``scale_by_bnp`` uses, and the size of BNP's step relative to SGD's at the
  same rate, ``|P g| / |g|`` per layer, at the initialisation with the
  running statistics set to one batch's (``rho = 0``). With ``--data-dir``
  the batch is real MNIST, else random pixels.

``python benchmarks/lr_rule.py tables [DIR]``
  The tables of the how-to from the stored run results (DIR, default
  ``docs/howto/lr_rule``): the rate-0.1 comparison and the sweep.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import optax  # noqa: E402

import bnp_optax  # noqa: E402
from bnp_optax.experiments import _data  # noqa: E402
from bnp_optax.experiments import _models  # noqa: E402
from bnp_optax.experiments import _qscale  # noqa: E402

BATCH = 128


def _batch(data_dir):
  if data_dir:
    ds = _data.load('mnist', data_dir)
    order = np.random.default_rng(0).permutation(len(ds.x_train))[:BATCH]
    return ds.x_train[order], ds.y_train[order], 'MNIST'
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (BATCH, 28, 28, 1)).astype(np.uint8)
  return x, rng.integers(0, 10, BATCH).astype(np.int32), 'random pixels'


def q2_report(data_dir=None) -> dict:
  """``q^2`` and BNP's relative step size per layer."""
  model = _models.make_model('flax_mnist_cnn', 'none', 10)
  x, y, source = _batch(data_dir)
  x = x.astype(np.float32) / 255.0
  params = model.init(jax.random.key(0), x[:1])['params']

  def loss(p):
    logits, stats = bnp_optax.linen.apply(model, {'params': p}, x)
    return _models.cross_entropy(logits, y), stats

  (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  q2 = _qscale.q_squared_per_layer(params, stats)
  # rho = 0: the running statistics are this batch's after one update.
  rows = {}
  for name, which in (('paper', 'paper'), ('no_conv', 'no_conv')):
    tx = optax.chain(bnp_optax.scale_by_bnp(rho=0.0),
                     _qscale.undo_q_scaling(which))
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    rows[name] = _qscale.step_ratio(grads, updates)
  layers = {}
  for layer, info in q2.items():
    layers[layer] = dict(
        kind=info['kind'], fan_in=int(info['fan_in']),
        batch_size=int(info['batch_size']),
        positions=float(info['positions']), q2=float(info['q2']),
        step_ratio_bnp=rows['paper'][layer],
        step_ratio_bnp_no_conv_q=rows['no_conv'][layer])
  return dict(batch=source, batch_size=BATCH, layers=layers)


def print_q2(report: dict) -> None:
  print(f'flax_mnist_cnn, batch size {report["batch_size"]} '
        f'({report["batch"]}); q^2 = max(n_in / N, sqrt(r s)):')
  print(f'{"layer":<8} {"kind":<6} {"n_in":>5} {"N":>4} {"r s":>5} '
        f'{"q^2":>6}  |Pg|/|g| BNP  |Pg|/|g| without conv 1/q^2')
  for name, r in report['layers'].items():
    print(f'{name:<8} {r["kind"]:<6} {r["fan_in"]:>5} {r["batch_size"]:>4} '
          f'{r["positions"]:>5g} {r["q2"]:>6.2f}  {r["step_ratio_bnp"]:>12.4f}'
          f'  {r["step_ratio_bnp_no_conv_q"]:>12.4f}')


def _pct(values):
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  mean = 100 * float(np.mean(values))
  if len(values) == 1:
    return f'{mean:.2f}'
  return f'{mean:.2f} ({100 * min(values):.2f}-{100 * max(values):.2f})'


def _loss(values):
  values = [v for v in values if v is not None]
  if not values:
    return 'diverged'
  if len(values) == 1:
    return f'{values[0]:.4f}'
  return f'{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})'


def tables(directory) -> str:
  """Markdown tables of the stored study."""
  directory = pathlib.Path(directory)
  lines = []
  groups = {}
  for path in sorted((directory / 'lr0.1').glob('*.json')):
    r = json.loads(path.read_text())
    c = r['config']
    key = (c['method'], c.get('bnp_q', 'paper'), c['learning_rate'])
    groups.setdefault(key, []).append(r)
  if groups:
    lines += ['| method | q scaling | rate | seeds | epoch-1 train loss | '
              'test accuracy % |', '|---|---|---|---|---|---|']
    for (method, q, lr), runs in groups.items():
      label = 'SGD momentum' if method == 'vanilla' else 'BNP momentum'
      q = '-' if method == 'vanilla' else q
      lines.append(
          f'| {label} | {q} | {lr:g} | {len(runs)} | '
          f'{_loss([r["final"]["train_loss"] for r in runs])} | '
          f'{_pct([r["final"]["test_accuracy"] for r in runs])} |')
  for path in sorted(directory.glob('sweep*.json')):
    s = json.loads(path.read_text())
    lines += ['', f'{path.name}: held-out accuracy % per rate '
              f'({len(s["seeds"])} seed(s), {s["num_validation"]} held-out '
              f'examples, {s["config"]["num_train"]} training examples)', '']
    rates = sorted({rate for m in s['methods'].values() for rate in m['grid']})
    lines.append('| method | bnp_q | ' + ' | '.join(f'{r:g}' for r in rates)
                 + ' | best rate | held-out % | test % at best |')
    lines.append('|---' * (len(rates) + 5) + '|')
    q = s['config'].get('bnp_q', 'paper')
    for method, m in s['methods'].items():
      by_rate = {row['learning_rate']: row for row in m['rows']}
      cells = []
      for rate in rates:
        row = by_rate.get(rate)
        cells.append('' if row is None else 'div' if row['diverged'] else
                     f'{100 * row["validation_accuracy_mean"]:.2f}')
      best = m['best']
      tail = ('none | - | -' if best is None else
              f'{m["best_learning_rate"]:g} | '
              f'{100 * best["validation_accuracy_mean"]:.2f} | '
              f'{100 * best["test_accuracy_mean"]:.2f}')
      lines.append(f'| {method} | {"-" if method == "vanilla" else q} | '
                   + ' | '.join(cells) + f' | {tail} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('q2', help="q^2 and BNP's relative step per layer")
  p.add_argument('--data-dir', default=None)
  p.add_argument('--out', default=None, help='also write the JSON here')
  p = sub.add_parser('tables', help="the how-to's tables from stored runs")
  p.add_argument('directory', nargs='?', default=ROOT / 'docs' / 'howto'
                 / 'lr_rule')
  args = parser.parse_args(argv)
  if args.command == 'q2':
    report = q2_report(args.data_dir)
    print_q2(report)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + '\n')
  else:
    print(tables(args.directory))
  return 0


if __name__ == '__main__':
  sys.exit(main())
