"""What BNP sees in the ViT: its projections' input statistics, measured.

BNP centres each layer's inputs (through the bias) and rescales each input
feature by its standard deviation. Either one can only help where the inputs
are off-centre or their features' scales differ. This script measures both
for every projection of the harness's ViT at initialisation. It uses one
batch of real CIFAR-10 training images, preprocessed as the harness does
(pixels / 255), and takes the statistics that ``bnp_optax.linen.apply``
records. It writes ``docs/transformers/input_stats_cpu.json``, which
``build.py`` renders on the page.

Usage::

  python docs/transformers/input_stats.py --data-dir DATA
"""

import argparse
import collections
import json
import pathlib

import jax
import numpy as np

import bnp_optax
from bnp_optax import experiments

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / 'input_stats_cpu.json'
BATCH = 512


def kind(path: str) -> str:
  """The projection kind of a layer path (blocks pooled)."""
  last = path.split('/')[-1]
  if last in ('query', 'key', 'value'):
    return 'attention q/k/v'
  if last == 'out':
    return 'attention output'
  if last == 'Dense_0':
    return 'MLP first layer'
  if last == 'Dense_1':
    return 'MLP second layer (post-GELU)'
  return {'patch_embedding': 'patch embedding', 'head': 'head'}[last]


def measure(model_name: str, x: np.ndarray) -> dict:
  """Per projection kind: off-centre and scale spread of the inputs."""
  model = experiments.make_model(model_name, 'none', 10)
  variables = model.init(jax.random.key(0), x[:1])
  _, stats = jax.jit(lambda v, x: bnp_optax.linen.apply(model, v, x))(
      variables, x)
  pooled = collections.defaultdict(lambda: ([], []))
  flat = {}

  def visit(path, node):
    if isinstance(node, bnp_optax.LayerStats):
      flat['/'.join(path)] = node
    else:
      for k, v in node.items():
        visit(path + (k,), v)

  visit((), stats)
  for path, s in flat.items():
    mean = np.ravel(np.asarray(s.mean, np.float64))
    std = np.sqrt(np.ravel(np.asarray(s.variance, np.float64)))
    offsets, spreads = pooled[kind(path)]
    # |mean| / std per feature: how far off-centre the inputs are.
    offsets.append(np.median(np.abs(mean) / std))
    # Largest over smallest standard deviation: BNP's rescaling's reach.
    spreads.append(std.max() / std.min())
  return {k: {'median_abs_mean_over_std': float(np.mean(o)),
              'std_max_over_min': float(np.mean(s)), 'layers': len(o)}
          for k, (o, s) in pooled.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data-dir', required=True)
  args = parser.parse_args(argv)
  ds = experiments.load_dataset('cifar10', args.data_dir)
  rng = np.random.default_rng(0)
  index = rng.choice(len(ds.x_train), BATCH, replace=False)
  x = ds.x_train[np.sort(index)].astype(np.float32) / 255.0
  out = {'batch': BATCH, 'models': {m: measure(m, x) for m in
                                    ('vit', 'vit_dyt', 'vit_nonorm')}}
  OUT.write_text(json.dumps(out, indent=1) + '\n')
  print(f'wrote {OUT}')


if __name__ == '__main__':
  main()
