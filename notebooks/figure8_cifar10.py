"""Reproduces the paper's Figure 8 (Section 5.1) on CIFAR-10.

A fully connected network 3072 -> 100 -> 100 -> 10 (ReLU, Glorot uniform
weights, zero biases, as in the paper's Appendix B) is trained with BNP + SGD
(learning rate 0.1, the paper's Table 2) at batch size 60. At every iteration
it computes, for the first neuron of the output layer (``[b_1, w_1]`` in
R^101), the condition number of the mini-batch Hessian, of the Hessian
preconditioned by the ``P`` that the optimizer applies at that iteration, and
``kappa(D)``, and prints their medians and the ratio against ``kappa(D)^2``.

Not run in CI (a few minutes on a CPU). Usage::

  python notebooks/figure8_cifar10.py --data-dir /path/to/data \\
      --epochs 2 --out figure8.npz --plot figure8.png

``--data-dir`` holds ``cifar10/cifar10_train.npz`` and
``cifar10/cifar10_test.npz`` (``x``: uint8 NHWC, ``y``: labels).
"""

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnp_optax
from bnp_optax import diagnostics
import bnp_optax.linen


class FC(nn.Module):
  """The paper's Figure 8 network: two hidden layers of 100, ReLU."""

  hidden: tuple[int, ...] = (100, 100)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.glorot_uniform()
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=init)(x))
    return nn.Dense(self.classes, kernel_init=init)(x)


def cross_entropy(logits, labels):
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  )


def load(data_dir, split):
  with np.load(os.path.join(data_dir, 'cifar10', f'cifar10_{split}.npz')) as f:
    x = f['x'].reshape(f['x'].shape[0], -1).astype(np.float32) / 255.0
    return x, f['y'].astype(np.int32).reshape(-1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--batch-size', type=int, default=60)
  parser.add_argument('--learning-rate', type=float, default=0.1)
  parser.add_argument('--every', type=int, default=1,
                      help='compute the condition numbers every k iterations')
  parser.add_argument('--max-iterations', type=int, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='save the series (.npz)')
  parser.add_argument('--plot', default=None, help='save a figure (.png)')
  args = parser.parse_args()

  x_train, y_train = load(args.data_dir, 'train')
  x_test, y_test = load(args.data_dir, 'test')
  model = FC()
  layer = 'Dense_2'  # the output layer
  params = model.init(jax.random.key(args.seed), x_train[:1])['params']
  tx = bnp_optax.bnp(args.learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, stats = bnp_optax.linen.apply(model, {'params': p}, x)
      return cross_entropy(logits, y), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params):
    logits = model.apply({'params': params}, x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  rng = np.random.default_rng(args.seed)
  n_batches = x_train.shape[0] // args.batch_size
  rows = []
  start = time.time()
  it = 0
  for epoch in range(args.epochs):
    order = rng.permutation(x_train.shape[0])
    for b in range(n_batches):
      if args.max_iterations is not None and it >= args.max_iterations:
        break
      idx = order[b * args.batch_size : (b + 1) * args.batch_size]
      x, y = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
      if it % args.every == 0:
        nh = diagnostics.neuron_hessian(
            model, {'params': params}, x,
            jax.tree_util.Partial(cross_entropy, labels=y),
            layer=layer, neuron=0,
        )
      new_params, opt_state, loss = step(params, opt_state, x, y)
      if it % args.every == 0:
        # The P applied to this iteration's gradient: running statistics
        # after this iteration's update (Algorithm 2, steps 2-3).
        running = opt_state[0].running_stats[layer]
        c = diagnostics.conditioning(nh.hessian, running)
        # The theory's P with this batch's own statistics (Theorem 3).
        batch = diagnostics.conditioning(
            nh.hessian, diagnostics.patch_statistics(nh.inputs)
        )
        # Without the regularisers (eps1 = eps2 = 0), as in Eq. 12.
        plain = diagnostics.conditioning(
            nh.hessian, running, eps1=0.0, eps2=0.0
        )
        rows.append((it, float(loss), c.kappa_hessian,
                     c.kappa_preconditioned, c.kappa_d,
                     batch.kappa_preconditioned, c.rank,
                     plain.kappa_preconditioned, plain.kappa_d))
      params = new_params
      it += 1
    acc = float(accuracy(params))
    print(f'epoch {epoch + 1}: test accuracy {acc:.4f}, '
          f'{time.time() - start:.0f} s', flush=True)

  r = np.array(rows)
  k_h, k_p, k_d, k_b = r[:, 2], r[:, 3], r[:, 4], r[:, 5]
  k_p0, k_d0 = r[:, 7], r[:, 8]
  ratio = k_h / k_p
  print(f'{len(r)} iterations with condition numbers; rank of the Hessian: '
        f'median {np.median(r[:, 6]):.0f} (of {101})')
  for name, v in [('kappa(H^T S H)', k_h), ('kappa(P^T H^T S H P)', k_p),
                  ('kappa(P_batch^T H^T S H P_batch)', k_b),
                  ('kappa(D)', k_d), ('kappa(D)^2', k_d**2),
                  ('improvement kappa_H / kappa_PHP', ratio),
                  ('improvement / kappa(D)^2', ratio / k_d**2),
                  ('eps=0: kappa(P^T H^T S H P)', k_p0),
                  ('eps=0: kappa(D)', k_d0),
                  ('eps=0: improvement', k_h / k_p0),
                  ('eps=0: improvement / kappa(D)^2', k_h / k_p0 / k_d0**2)]:
    q = np.percentile(v, [5, 50, 95])
    print(f'{name:34s} 5%: {q[0]:10.3g}  median: {q[1]:10.3g}  '
          f'95%: {q[2]:10.3g}')
  print(f'log10(improvement) / log10(kappa(D)^2): median '
        f'{np.median(np.log10(ratio) / np.log10(k_d**2)):.2f}')
  if args.out:
    np.savez(args.out, iteration=r[:, 0], loss=r[:, 1], kappa_hessian=k_h,
             kappa_preconditioned=k_p, kappa_d=k_d,
             kappa_preconditioned_batch=k_b, rank=r[:, 6],
             kappa_preconditioned_eps0=k_p0, kappa_d_eps0=k_d0)
  if args.plot:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.semilogy(r[:, 0], k_h, lw=0.5, label='Hessian')
    ax1.semilogy(r[:, 0], k_p, lw=0.5, label='BNP preconditioned')
    ax1.set_xlabel('iteration')
    ax1.set_ylabel('condition number')
    ax1.legend()
    ax2.semilogy(r[:, 0], k_d, lw=0.5, label='kappa(D)')
    ax2.semilogy(r[:, 0], ratio, lw=0.5, label='kappa_H / kappa_PHP')
    ax2.set_xlabel('iteration')
    ax2.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == '__main__':
  main()
