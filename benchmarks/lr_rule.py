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
  The tables of the how-to from the stored sweep summaries (DIR, default
  ``docs/howto/lr_rule``), one per summary, a row per method and rate
  (mean over seeds, the min-max in brackets).
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
from bnp_optax import experiments  # noqa: E402

BATCH = 128


def _batch(data_dir):
  if data_dir:
    ds = experiments.load_dataset('mnist', data_dir)
    order = np.random.default_rng(0).permutation(len(ds.x_train))[:BATCH]
    return ds.x_train[order], ds.y_train[order], 'MNIST'
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (BATCH, 28, 28, 1)).astype(np.uint8)
  return x, rng.integers(0, 10, BATCH).astype(np.int32), 'random pixels'


def q2_report(data_dir=None) -> dict:
  """``q^2`` and BNP's relative step size per layer."""
  model = experiments.make_model('flax_mnist_cnn', 'none', 10)
  x, y, source = _batch(data_dir)
  x = x.astype(np.float32) / 255.0
  params = model.init(jax.random.key(0), x[:1])['params']

  def loss(p):
    logits, stats = bnp_optax.linen.apply(model, {'params': p}, x)
    return experiments.cross_entropy(logits, y), stats

  (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  q2 = experiments.q_squared_per_layer(params, stats)
  # rho = 0: the running statistics are this batch's after one update;
  # the paper's rho = 0.99 at the first step: still nearly mu = 0,
  # sigma^2 = 1, their initial values.
  rows = {}
  for name, which, rho in (('paper', 'paper', 0.0),
                           ('no_conv', 'no_conv', 0.0),
                           ('first_step', 'paper', 0.99)):
    tx = optax.chain(bnp_optax.scale_by_bnp(rho=rho),
                     experiments.undo_q_scaling(which))
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    rows[name] = experiments.step_ratio(grads, updates)
  layers = {}
  for layer, info in q2.items():
    layers[layer] = dict(
        kind=info['kind'], fan_in=int(info['fan_in']),
        batch_size=int(info['batch_size']),
        positions=float(info['positions']), q2=float(info['q2']),
        step_ratio_bnp_first_step=rows['first_step'][layer],
        step_ratio_bnp=rows['paper'][layer],
        step_ratio_bnp_no_conv_q=rows['no_conv'][layer])
  return dict(batch=source, batch_size=BATCH, layers=layers)


def print_q2(report: dict) -> None:
  print(f'flax_mnist_cnn, batch size {report["batch_size"]} '
        f'({report["batch"]}); q^2 = max(n_in / N, sqrt(r s)):')
  print("|Pg|/|g|: the size of BNP's step relative to SGD's at the same "
        'rate, at the first step (running statistics near their initial '
        'mean 0, variance 1) and with the statistics of this batch (rho = 0: '
        "where they converge), with and without the conv layers' 1/q^2")
  print(f'{"layer":<8} {"kind":<6} {"n_in":>5} {"N":>4} {"r s":>5} '
        f'{"q^2":>6} {"first step":>11} {"converged":>10} '
        f'{"no conv 1/q^2":>14}')
  for name, r in report['layers'].items():
    print(f'{name:<8} {r["kind"]:<6} {r["fan_in"]:>5} {r["batch_size"]:>4} '
          f'{r["positions"]:>5g} {r["q2"]:>6.2f} '
          f'{r["step_ratio_bnp_first_step"]:>11.4f} '
          f'{r["step_ratio_bnp"]:>10.4f} '
          f'{r["step_ratio_bnp_no_conv_q"]:>14.4f}')


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
    return 'nan'
  if len(values) == 1:
    return f'{values[0]:.4g}'
  return f'{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})'


SUMMARIES = ('sweep-3seeds.json', 'sweep.json',
             'sweep-bnp-no-conv-q.json', 'sweep-bnp-no-q.json',
             'sweep-bnp-debias.json')


def tables(directory) -> str:
  """Markdown tables of the stored sweep summaries, one per file."""
  directory = pathlib.Path(directory)
  names = [n for n in SUMMARIES if (directory / n).exists()]
  names += sorted(p.name for p in directory.glob('*.json')
                  if p.name not in SUMMARIES and p.name != 'q2.json')
  lines = []
  for name in names:
    s = json.loads((directory / name).read_text())
    c = s['config']
    variant = ', '.join(
        ([f'bnp_q={c["bnp_q"]}'] if 'bnp_q' in c else [])
        + (['debiased'] if c.get('bnp_debias') else [])) or "paper's BNP"
    lines += [
        f'{name}: {c["num_train"]} training examples, {c["epochs"]} '
        f'epoch(s), held-out {s["num_validation"]}, seeds '
        f'{",".join(map(str, s["seeds"]))}; BNP variant: {variant}', '',
        '| method | rate | train loss (epoch mean) | held-out acc % | '
        'test acc % | diverged | selected |', '|---|---|---|---|---|---|---|']
    for method, m in s['methods'].items():
      label = 'SGD momentum' if method == 'vanilla' else 'BNP momentum'
      for row in m['rows']:
        best = row['learning_rate'] == m['best_learning_rate']
        chosen = 'yes' if best else ''
        div = ','.join(map(str, row['diverged_seeds'])) or ''
        lines.append(
            f'| {label} | {row["learning_rate"]:g} | '
            f'{_loss(row["train_loss"])} | '
            f'{_pct(row["validation_accuracy"])} | '
            f'{_pct(row["test_accuracy"])} | {div} | {chosen} |')
    lines.append('')
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
