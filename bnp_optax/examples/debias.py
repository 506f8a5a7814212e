"""Does the opt-in debiased running average help? A side-by-side run.

Trains the paper's fully connected network with BNP + SGD, once with the
paper's running averages (``debias=False``, the default) and once with
debiased ones (``debias=True``), on the same data, seeds and learning rate,
and prints the mean training loss over the first steps (where the pull of
the initial ``mu = 0, sigma = 1`` matters), over the whole run, and the final
test accuracy.

  python -m bnp_optax.examples.debias --data-dir ../shared/data \\
      --dataset mnist --batch-size 60 --steps 1000 --seeds 0 1 2

Without ``--data-dir`` it uses scikit-learn's bundled digits (offline).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import bnp_optax
from bnp_optax.examples.digits import bnp_train_step
from bnp_optax.examples.digits import FullyConnected


def _load(dataset: str, data_dir: str | None):
  from bnp_optax import experiments  # pylint: disable=g-import-not-at-top
  if data_dir is None:
    ds = experiments.load_digits()
  else:
    ds = experiments.load_dataset(dataset, data_dir)
  scale = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  return (scale(ds.x_train), ds.y_train), (scale(ds.x_test), ds.y_test)


def run(data, *, debias: bool, seed: int, batch_size: int, steps: int,
        learning_rate: float, early: int):
  (x_train, y_train), (x_test, y_test) = data
  model = FullyConnected()
  params = model.init(jax.random.key(seed), x_train[:1])['params']
  tx = bnp_optax.bnp(learning_rate, debias=debias)
  state = tx.init(params)
  step = bnp_train_step(model, tx)

  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(x_train))
                          for _ in range(steps * batch_size // len(x_train)
                                         + 1)])
  losses = []
  for i in range(steps):
    batch = order[i * batch_size:(i + 1) * batch_size]
    params, state, loss = step(params, state, x_train[batch], y_train[batch])
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses))
  logits = model.apply({'params': params}, x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  return float(losses[:early].mean()), float(losses.mean()), accuracy


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--dataset', default='mnist')
  parser.add_argument('--batch-size', type=int, default=60)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--early-steps', type=int, default=50)
  parser.add_argument('--learning-rate', type=float, default=0.5)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  args = parser.parse_args(argv)
  data = _load(args.dataset, args.data_dir)
  print(f'{args.dataset if args.data_dir else "digits"}: batch size '
        f'{args.batch_size}, {args.steps} steps, lr {args.learning_rate}, '
        f'seeds {args.seeds}')
  first = f'loss first {args.early_steps}'
  print(f'{"debias":>6} {"seed":>4}  {first:>14}'
        f'  {"loss all":>9}  {"test acc":>8}')
  results = {}
  for debias in (False, True):
    rows = []
    for seed in args.seeds:
      row = run(data, debias=debias, seed=seed, batch_size=args.batch_size,
                steps=args.steps, learning_rate=args.learning_rate,
                early=args.early_steps)
      rows.append(row)
      print(f'{str(debias):>6} {seed:>4}  {row[0]:>14.4f}  {row[1]:>9.4f}  '
            f'{row[2]:>8.2%}', flush=True)
    results[debias] = np.mean(rows, axis=0)
  for debias, (early, whole, accuracy) in results.items():
    print(f'mean debias={debias}: first-steps loss {early:.4f}, loss '
          f'{whole:.4f}, test accuracy {accuracy:.2%}')
  return results


if __name__ == '__main__':
  main()
