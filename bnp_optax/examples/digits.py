"""Train the paper's fully connected network with BNP, offline.

The network is the one of Section 5 (three hidden layers of 100, ReLU,
Glorot-uniform weights, zero biases). The data is scikit-learn's bundled
8x8 handwritten digits (1797 images, no download). The same network is
trained with plain SGD and with BNP + SGD at the paper's MNIST learning rates
(Table 2), and the loss and test accuracy of both are printed every epoch.

Run it with::

  python -m bnp_optax.examples.digits [--epochs 10] [--batch-size 60]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnp_optax

# The paper's network, loss and data loader, shared with the experiment
# harness (one definition of each).
from bnp_optax.experiments import cross_entropy
from bnp_optax.experiments import FullyConnected

__all__ = ['FullyConnected', 'bnp_train_step', 'cross_entropy',
           'load_digits', 'main', 'train']


def load_digits(seed: int = 0, test_fraction: float = 0.2):
  """scikit-learn's digits, pixels scaled to [0, 1], split at random.

  Returns:
    ``((x_train, y_train), (x_test, y_test))``, images ``(n, 8, 8, 1)``.
  """
  from bnp_optax import experiments  # pylint: disable=g-import-not-at-top
  try:
    ds = experiments.load_digits(test_fraction, seed=seed)
  except experiments.DataError as e:
    raise SystemExit(str(e)) from e
  scale = lambda x: x.astype(np.float32) / 255.0
  return (scale(ds.x_train), ds.y_train), (scale(ds.x_test), ds.y_test)


def bnp_train_step(model, tx):
  """The jit-compiled BNP training step: forward with statistics, update."""

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits, layer_stats = bnp_optax.linen.apply(
          model, {'params': params}, x)
      return cross_entropy(logits, y), layer_stats
    (loss, layer_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=layer_stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(method: str, data, *, epochs: int, batch_size: int,
          learning_rate: float, seed: int = 0):
  """Trains with 'sgd' or 'bnp'; yields (epoch, train loss, test accuracy)."""
  (x_train, y_train), (x_test, y_test) = data
  model = FullyConnected()
  params = model.init(jax.random.key(seed), x_train[:1])['params']
  if method == 'bnp':
    tx = bnp_optax.bnp(learning_rate)
  else:
    tx = optax.sgd(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def sgd_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model.apply({'params': p}, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = bnp_train_step(model, tx) if method == 'bnp' else sgd_step

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': params}, x), -1) == y)

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(x_train) // batch_size
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      batch = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, x_train[batch],
                                     y_train[batch])
      losses.append(loss)
    yield epoch, float(np.mean(jax.device_get(losses))), float(
        accuracy(params, x_test, y_test))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=60)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--sgd-learning-rate', type=float, default=0.1,
                      help='paper, Table 2, vanilla on MNIST')
  parser.add_argument('--bnp-learning-rate', type=float, default=0.5,
                      help='paper, Table 2, BNP on MNIST')
  args = parser.parse_args(argv)
  data = load_digits(args.seed)
  print(f'digits: {len(data[0][0])} train / {len(data[1][0])} test images, '
        f'batch size {args.batch_size}, {jax.devices()[0].platform}')
  runs = {
      'sgd': train('sgd', data, epochs=args.epochs,
                   batch_size=args.batch_size,
                   learning_rate=args.sgd_learning_rate, seed=args.seed),
      'bnp': train('bnp', data, epochs=args.epochs,
                   batch_size=args.batch_size,
                   learning_rate=args.bnp_learning_rate, seed=args.seed),
  }
  print(f'{"epoch":>5}  {"SGD loss":>9} {"SGD acc":>8}  '
        f'{"BNP loss":>9} {"BNP acc":>8}')
  start = time.perf_counter()
  final = {}
  for (epoch, sgd_loss, sgd_acc), (_, bnp_loss, bnp_acc) in zip(
      runs['sgd'], runs['bnp']):
    print(f'{epoch:>5}  {sgd_loss:>9.4f} {sgd_acc:>8.2%}  '
          f'{bnp_loss:>9.4f} {bnp_acc:>8.2%}', flush=True)
    final = {'sgd': (sgd_loss, sgd_acc), 'bnp': (bnp_loss, bnp_acc)}
  print(f'done in {time.perf_counter() - start:.1f}s; final test accuracy: '
        f'SGD {final["sgd"][1]:.2%}, BNP {final["bnp"][1]:.2%}')
  return final


if __name__ == '__main__':
  main()
