"""Reproduces the paper's Figure 8 (Section 5.1) on CIFAR-10.

A thin wrapper around the experiment harness's ``fig8`` suite (``python -m
bnp_optax.experiments suite fig8``, which does the work and writes the run's
JSON): a fully connected network 3072 -> 100 -> 100 -> 10 (the harness's
``fc2``: ReLU, Glorot uniform weights, zero biases, as in the paper's
Appendix B) trained with BNP + SGD (learning rate 0.1, the paper's Table 2)
at batch size 60. At every iteration the harness computes, for the first
neuron of the output layer (``[b_1, w_1]`` in R^101), the condition number
of the mini-batch Hessian, of the Hessian preconditioned by the ``P`` that
the optimizer applies at that iteration, and ``kappa(D)``; this script
prints their percentiles and saves the series (``--out``) and the figure
(``--plot``).

Not run in CI (a few minutes on a CPU). Usage::

  python notebooks/figure8_cifar10.py --data-dir /path/to/data \\
      --epochs 2 --out figure8.npz --plot figure8.png

``--data-dir`` holds CIFAR-10 in any format the harness reads (e.g.
``cifar10/cifar10_train.npz`` and ``cifar10/cifar10_test.npz``). Other
harness flags (``--every`` is ``--conditioning-every``) can follow ``--``.
"""

import argparse
import pathlib
import sys

import numpy as np

from bnp_optax import experiments


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--every', type=int, default=1,
                      help='compute the condition numbers every k iterations')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--results', default='results',
                      help="the harness's --out (the run's JSON goes to "
                      'RESULTS/fig8/; an existing identical run is reused)')
  parser.add_argument('--out', default=None, help='save the series (.npz)')
  parser.add_argument('--plot', default=None, help='save the figure (.png)')
  args, rest = parser.parse_known_args(argv)
  rest = [a for a in rest if a != '--']
  status = experiments.main(
      # The condition numbers are BNP's; the suite's vanilla run (Figure 8
      # left) is not needed for them.
      ['suite', 'fig8', '--methods', 'bnp', '--data-dir', args.data_dir,
       '--epochs',
       str(args.epochs), '--conditioning-every', str(args.every), '--seeds',
       str(args.seed), '--out', args.results, '--skip-existing',
       '--no-progress', *rest])
  if status:
    return status
  suite = experiments.SUITES['fig8']
  wanted = dict(epochs=args.epochs, seed=args.seed,
                conditioning_every=args.every)
  runs = [r for r in experiments.load_results([pathlib.Path(args.results)
                                               / suite.name])
          if all(r['config'][k] == v for k, v in wanted.items())]
  result = max(runs, key=lambda r: r['created'])  # Just made or kept.
  series = experiments.conditioning_series(result)
  if args.out:
    np.savez(args.out, iteration=series['step'], **{
        k: v for k, v in series.items() if k not in ('step', 'size')})
  if args.plot:
    print(f'figure: {experiments.plot_conditioning(result, args.plot)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
