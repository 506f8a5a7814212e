"""Writes the CIFAR-10 subset that the GPU check carries with it.

The GPU machine gets a copy of the checkout only (at most 64 MiB, ignored
folders included when named), not ``../shared`` beside it. This script
writes a compressed subset of CIFAR-10 into the ignored folder ``gpu_data/``
at the repository root, in the format ``bnp_optax.experiments`` reads from a
data directory (``cifar10/cifar10_train.npz`` and ``cifar10_test.npz``,
arrays ``x`` uint8 NHWC and ``y``)::

  python benchmarks/make_gpu_data.py                    # from ../shared/data
  python benchmarks/make_gpu_data.py --source DIR --train 10000 --test 2000

The training images are the first ``--train`` of the official order; the
test images ``--test / 10`` per class (the shared copy is sorted by class),
shuffled with a fixed seed. The files are written with
``numpy.savez_compressed`` and the script fails if they exceed ``--max-mb``.
"""

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--source', default=str(ROOT.parent / 'shared' / 'data'),
                 help='a data directory with cifar10/cifar10_*.npz')
  p.add_argument('--out', default=str(ROOT / 'gpu_data'))
  p.add_argument('--train', type=int, default=10000)
  p.add_argument('--test', type=int, default=2000)
  p.add_argument('--max-mb', type=float, default=40.0)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  source = pathlib.Path(args.source)
  if (source / 'cifar10').is_dir():
    source = source / 'cifar10'
  with np.load(source / 'cifar10_train.npz') as f:
    x_train, y_train = f['x'][:args.train], f['y'][:args.train]
  with np.load(source / 'cifar10_test.npz') as f:
    x_test_all, y_test_all = f['x'], f['y']
  per_class = args.test // 10
  picked = np.concatenate([np.flatnonzero(y_test_all == c)[:per_class]
                           for c in range(10)])
  picked = np.random.default_rng(args.seed).permutation(picked)
  x_test, y_test = x_test_all[picked], y_test_all[picked]
  out = pathlib.Path(args.out) / 'cifar10'
  out.mkdir(parents=True, exist_ok=True)
  for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
    np.savez_compressed(out / f'cifar10_{split}.npz',
                        x=np.ascontiguousarray(x, np.uint8),
                        y=np.asarray(y, np.uint8))
  sizes = {f.name: f.stat().st_size for f in out.glob('*.npz')}
  total = sum(sizes.values()) / 2**20
  print(f'wrote {out}: {len(x_train)} train, {len(x_test)} test images, '
        + ', '.join(f'{k} {v / 2**20:.1f} MB' for k, v in sizes.items())
        + f' ({total:.1f} MB)')
  if total > args.max_mb:
    print(f'the subset is {total:.1f} MB, over --max-mb {args.max_mb}',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
