"""Grafted BNP at the learning rate a user already has (issue 21).

Every program trains its baseline optimizer at the baseline's own learning
rate, then the same optimizer after ``scale_by_bnp(graft=True)`` at that
same rate, the paper's BNP at that rate and at the rule's rate (ten times
it, ``docs/howto/learning_rate.md``), and, for the paper's networks, the
paper's BNP at the paper's rate. Commands:

``python benchmarks/graft_study.py run PROGRAM [--seeds 0,1,2] [--data-dir D]``
  Trains every method of ``PROGRAM`` (see ``PROGRAMS``) and writes
  ``docs/howto/lr_rule/graft/PROGRAM.json``.

``python benchmarks/graft_study.py sizes PROGRAM [--seeds 0] [--data-dir D]``
  The size-matching study: grafted BNP with the size matched per layer
  (kernel and bias together), per leaf (kernel and bias separately), per
  output unit, over the whole network, or as a running average; writes
  ``docs/howto/lr_rule/graft/sizes-PROGRAM.json``.

``python benchmarks/graft_study.py table [DIR] [--write | --check]``
  The tables of ``docs/howto/learning_rate.md`` from the JSON in DIR
  (default ``docs/howto/lr_rule/graft``), as Markdown; ``--write`` puts
  them into the page (between its ``graft-results``/``graft-sizes``
  markers), ``--check`` exits 1 unless the page holds them.

Protocol: data from ``--data-dir`` (MNIST IDX / CIFAR-10 npz, the harness's
loader) or the offline ``digits``; pixels / 255; each seed draws its own
initialisation and batch order; the test accuracy is over the whole test
set after the last step; the training loss is the mean over the last tenth
of the steps. A run diverged when its loss is not finite or its final
training loss is above the untrained network's loss on 1,000 test images.
"""

import argparse
from collections.abc import Callable
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import bnp_optax  # noqa: E402
from bnp_optax import experiments  # noqa: E402
import bnp_optax.nnx  # noqa: E402
import bnp_optax.tracing  # noqa: E402

OUT = ROOT / 'docs' / 'howto' / 'lr_rule' / 'graft'


# ---------------------------------------------------------------- models


class Net(NamedTuple):
  """A model as functions of a parameter pytree.

  Attributes:
    init: ``key, x -> params``.
    forward: ``params, x -> (logits, layer_stats)`` (BNP's capture route).
    apply: ``params, x -> logits``.
    layer_specs: ``params, x -> layer_specs`` for ``scale_by_bnp``, or
      ``None`` (Flax layouts).
  """

  init: Callable
  forward: Callable
  apply: Callable
  layer_specs: Callable | None = None


def linen_net(module) -> Net:
  def init(key, x):
    return module.init(key, x)['params']

  def forward(params, x):
    return bnp_optax.linen.apply(module, {'params': params}, x)

  def apply(params, x):
    return module.apply({'params': params}, x)

  return Net(init, forward, apply)


def flax_nnx_mnist_cnn():
  """The CNN of Flax's NNX MNIST tutorial (docs_nnx/mnist_tutorial, 0.8-0.10).

  Conv(1, 32, 3x3) - ReLU - avg_pool 2x2 - Conv(32, 64, 3x3) - ReLU -
  avg_pool - Linear(3136, 256) - ReLU - Linear(256, 10).
  """
  from flax import nnx

  class CNN(nnx.Module):
    """A simple CNN model (the tutorial's)."""

    def __init__(self, *, rngs: nnx.Rngs):
      self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
      self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
      self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2),
                                        strides=(2, 2))
      self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
      self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
      x = self.avg_pool(nnx.relu(self.conv1(x)))
      x = self.avg_pool(nnx.relu(self.conv2(x)))
      x = x.reshape(x.shape[0], -1)  # flatten
      x = nnx.relu(self.linear1(x))
      x = self.linear2(x)
      return x

  graphdef = nnx.graphdef(CNN(rngs=nnx.Rngs(0)))

  def init(key, x):
    del x
    return nnx.state(CNN(rngs=nnx.Rngs(params=key)), nnx.Param)

  def forward(params, x):
    return bnp_optax.nnx.apply(nnx.merge(graphdef, params), x)

  def apply(params, x):
    return nnx.merge(graphdef, params)(x)

  return Net(init, forward, apply)


def equinox_mnist_cnn():
  """The CNN of Equinox's MNIST tutorial (examples/mnist.ipynb).

  Conv2d(1, 3, 4) - MaxPool2d(2, stride 1) - ReLU - flatten -
  Linear(1728, 512) - sigmoid - Linear(512, 64) - ReLU - Linear(64, 10) -
  log_softmax, applied per example under ``jax.vmap``.
  """
  import equinox as eqx

  class CNN(eqx.Module):
    layers: list

    def __init__(self, key):
      key1, key2, key3, key4 = jax.random.split(key, 4)
      self.layers = [
          eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
          eqx.nn.MaxPool2d(kernel_size=2),
          jax.nn.relu,
          jnp.ravel,
          eqx.nn.Linear(1728, 512, key=key2),
          jax.nn.sigmoid,
          eqx.nn.Linear(512, 64, key=key3),
          jax.nn.relu,
          eqx.nn.Linear(64, 10, key=key4),
          jax.nn.log_softmax,
      ]

    def __call__(self, x):
      for layer in self.layers:
        x = layer(x)
      return x

  _, static = eqx.partition(CNN(jax.random.key(0)), eqx.is_array)

  def apply(params, x):
    # NHWC batches in, the tutorial's CHW per example.
    return jax.vmap(eqx.combine(params, static))(jnp.moveaxis(x, -1, 1))

  def init(key, x):
    del x
    return eqx.partition(CNN(key), eqx.is_array)[0]

  def forward(params, x):
    return bnp_optax.tracing.apply(apply, params, x)

  def specs(params, x):
    return bnp_optax.tracing.layer_specs(apply, params, x)

  return Net(init, forward, apply, specs)


def haiku_mnist_mlp():
  """The MLP of Haiku's MNIST example (examples/mnist.py): 300-100-10."""
  import haiku as hk

  def net_fn(x):
    mlp = hk.Sequential([
        hk.Flatten(),
        hk.Linear(300), jax.nn.relu,
        hk.Linear(100), jax.nn.relu,
        hk.Linear(10),
    ])
    return mlp(x)

  net = hk.without_apply_rng(hk.transform(net_fn))

  def forward(params, x):
    return bnp_optax.tracing.apply(net.apply, params, x)

  def specs(params, x):
    return bnp_optax.tracing.layer_specs(net.apply, params, x)

  return Net(net.init, forward, net.apply, specs)


# -------------------------------------------------------------- programs


class Program(NamedTuple):
  """One user's program: a model, its data and its optimizer.

  Attributes:
    label: what the tables call it.
    net: builds the :class:`Net`.
    dataset: ``mnist``, ``cifar10`` or ``digits``.
    batch_size: the program's batch size.
    steps: training steps.
    optimizer: the baseline, ``'sgd'``, ``'momentum'`` (0.9) or ``'adamw'``.
    rate: the baseline's own learning rate.
    paper_rate: the paper's BNP rate (Tables 2, 3), for the paper's networks.
    train_subset: train on this many images (a fixed subset), or all.
    seeds: the default seeds.
    note: how the program was cut, for the table.
    scan: run chunks of steps as one ``lax.scan``; off for convolutions,
      which XLA:CPU runs several times slower inside a scan (README, Runs).
  """

  label: str
  net: Callable[[], Net]
  dataset: str
  batch_size: int
  steps: int
  optimizer: str
  rate: float
  paper_rate: float | None = None
  train_subset: int | None = None
  seeds: tuple[int, ...] = (0, 1, 2)
  note: str = ''
  scan: bool = True


def _harness(name):
  return lambda: linen_net(experiments.make_model(name, 'none', 10))


PROGRAMS = {
    'flax_linen_mnist': Program(
        "Flax's linen MNIST example", _harness('flax_mnist_cnn'), 'mnist',
        128, 468, 'momentum', 0.1, note='1 epoch', scan=False),
    'flax_nnx_mnist': Program(
        "Flax's NNX MNIST tutorial", flax_nnx_mnist_cnn, 'mnist', 32, 1200,
        'adamw', 0.005, note="the tutorial's 1200 steps", scan=False),
    'equinox_mnist': Program(
        "Equinox's MNIST tutorial CNN", equinox_mnist_cnn, 'mnist', 64, 300,
        'adamw', 3e-4, note="the tutorial's 300 steps", scan=False),
    'haiku_mnist_sgd': Program(
        "Haiku's MNIST example MLP, SGD", haiku_mnist_mlp, 'mnist', 128, 468,
        'sgd', 0.1, note='1 epoch; the example trains with Adam'),
    'haiku_mnist_adam': Program(
        "Haiku's MNIST example MLP, Adam", haiku_mnist_mlp, 'mnist', 128,
        468, 'adam', 1e-3, note="1 epoch; the example's optimizer"),
    'fc_mnist_b60': Program(
        "the paper's FC, MNIST, batch 60", _harness('fc'), 'mnist', 60, 1000,
        'sgd', 0.1, paper_rate=0.5, note='1 epoch'),
    'fc_mnist_b1': Program(
        "the paper's FC, MNIST, batch 1", _harness('fc'), 'mnist', 1, 10000,
        'sgd', 5e-4, paper_rate=0.1, note='10,000 steps (1/6 epoch)'),
    'cnn5_cifar10_b128': Program(
        "the paper's CNN, CIFAR-10, batch 128", _harness('cnn5'), 'cifar10',
        128, 100, 'sgd', 0.1, paper_rate=0.1, train_subset=12800,
        seeds=(0, 1), note='1 epoch of a 12,800-image subset', scan=False),
    'cnn5_cifar10_b2': Program(
        "the paper's CNN, CIFAR-10, batch 2", _harness('cnn5'), 'cifar10', 2,
        5000, 'sgd', 1e-3, paper_rate=1e-2, train_subset=10000, seeds=(0, 1),
        note='1 epoch of a 10,000-image subset', scan=False),
}


def base_optimizer(kind: str, rate: float) -> optax.GradientTransformation:
  if kind == 'sgd':
    return optax.sgd(rate)
  if kind == 'momentum':
    return optax.sgd(rate, momentum=0.9)
  if kind == 'adamw':
    return optax.adamw(rate, b1=0.9)
  if kind == 'adam':
    return optax.adam(rate)
  raise ValueError(f'unknown optimizer {kind!r}')


def methods(program: Program) -> dict[str, tuple[str, float, Any]]:
  """``{method: (description, rate, bnp options or None)}``."""
  rate = program.rate
  out = {
      'baseline': (program.optimizer, rate, None),
      'bnp_graft': ('BNP graft', rate, dict(graft=True)),
      'bnp': ('BNP', rate, dict()),
  }
  if program.optimizer != 'adamw' and program.optimizer != 'adam':
    out['bnp_10x'] = ('BNP', 10 * rate, dict())
  if program.paper_rate is not None and program.paper_rate not in (
      rate, 10 * rate):
    out['bnp_paper'] = ('BNP', program.paper_rate, dict())
  return out


# ------------------------------------------------- size-matching variants


def _layers(tree):
  """``{path: {'kernel', 'bias'}}`` of a Flax parameter dict."""
  found = {}

  def visit(node, path):
    if isinstance(node, dict):
      if 'kernel' in node:
        found[path] = node
      for key, child in node.items():
        visit(child, f'{path}/{key}' if path else key)

  visit(tree, '')
  return found


def sized_bnp(mode: str, rho: float = 0.99) -> optax.GradientTransformation:
  """Experiment-only grafted BNP with the size matched by ``mode``.

  ``layer``: kernel and bias together (``scale_by_bnp(graft=True)``);
  ``leaf``: kernel and bias separately; ``unit``: per output unit (a kernel
  column and its bias entry); ``global``: one size for all the layers;
  ``running``: per layer, the ratio of running averages (decay ``rho``) of
  the squared norms instead of this step's.
  """
  inner = bnp_optax.scale_by_bnp()

  def init_fn(params):
    norms = {name: jnp.zeros([2]) for name in _layers(params)}
    return inner.init(params), norms

  def update_fn(updates, state, params=None, *, layer_stats=None, **kw):
    del kw
    pre, inner_state = inner.update(updates, state[0], params,
                                    layer_stats=layer_stats)
    raw_layers, pre_layers = _layers(updates), _layers(pre)
    sq = lambda xs: sum(jnp.sum(jnp.square(x)) for x in xs)
    safe = lambda a, b: a / jnp.where(b > 0, b, 1)
    scales, norms = {}, dict(state[1])
    if mode == 'global':
      total = jnp.sqrt(safe(sq([x for n in raw_layers
                                for x in raw_layers[n].values()]),
                            sq([x for n in pre_layers
                                for x in pre_layers[n].values()])))
    for name in raw_layers:
      raw, new = raw_layers[name], pre_layers[name]
      if mode == 'layer':
        s = jnp.sqrt(safe(sq(raw.values()), sq(new.values())))
        scales[name] = {k: s for k in new}
      elif mode == 'leaf':
        scales[name] = {k: jnp.sqrt(safe(sq([raw[k]]), sq([new[k]])))
                        for k in new}
      elif mode == 'unit':
        col = lambda d: (jnp.sum(jnp.square(d['kernel']).reshape(
            -1, d['kernel'].shape[-1]), axis=0) + jnp.square(d['bias']))
        s = jnp.sqrt(safe(col(raw), col(new)))
        scales[name] = {'kernel': s, 'bias': s}
      elif mode == 'global':
        scales[name] = {k: total for k in new}
      elif mode == 'running':
        now = jnp.stack([sq(raw.values()), sq(new.values())])
        norms[name] = rho * norms[name] + (1 - rho) * now
        s = jnp.sqrt(safe(norms[name][0], norms[name][1]))
        scales[name] = {k: s for k in new}
      else:
        raise ValueError(mode)

    def rescale(tree, path=''):
      if isinstance(tree, dict):
        if path in scales:
          return {k: v * scales[path][k] for k, v in tree.items()}
        return {k: rescale(v, f'{path}/{k}' if path else k)
                for k, v in tree.items()}
      return tree

    return rescale(pre), (inner_state, norms)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


SIZE_MODES = ('layer', 'leaf', 'unit', 'global', 'running')


# -------------------------------------------------------------- training


_DATA_CACHE = {}


def load_data(program: Program, data_dir):
  key = (program.dataset, program.train_subset)
  if key not in _DATA_CACHE:
    if program.dataset == 'digits':
      ds = experiments.load_dataset('digits')
    else:
      if data_dir is None:
        raise SystemExit(f'{program.dataset} needs --data-dir')
      ds = experiments.load_dataset(program.dataset, data_dir)
    if program.train_subset:
      ds = experiments.subset_dataset(ds, train=program.train_subset)
    _DATA_CACHE[key] = (
        jnp.asarray(ds.x_train.astype(np.float32) / 255.0),
        jnp.asarray(ds.y_train.astype(np.int32)),
        jnp.asarray(ds.x_test.astype(np.float32) / 255.0),
        jnp.asarray(ds.y_test.astype(np.int32)))
  return _DATA_CACHE[key]


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()


def train(program: Program, net: Net, tx_factory, seed: int, data,
          *, chunk: int = 50) -> dict:
  """Trains one run; returns its record."""
  x_train, y_train, x_test, y_test = data
  n = x_train.shape[0]
  key = jax.random.key(seed)
  params = net.init(key, x_train[:2])
  specs = (None if net.layer_specs is None
           else net.layer_specs(params, x_train[:program.batch_size]))
  tx = optax.with_extra_args_support(tx_factory(specs))
  opt_state = tx.init(params)
  untrained = float(jax.jit(lambda p: _loss(net.apply(p, x_test[:1000]),
                                            y_test[:1000]))(params))

  def body(carry, batch_idx, xs, ys):
    params, opt_state = carry
    x, y = xs[batch_idx], ys[batch_idx]

    def loss_fn(p):
      logits, stats = net.forward(p, x)
      return _loss(logits, y), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return (optax.apply_updates(params, updates), opt_state), loss

  # The data are arguments, not constants baked into the compiled step.
  @jax.jit
  def scan_chunk(params, opt_state, idx, xs, ys):
    return jax.lax.scan(lambda c, i: body(c, i, xs, ys), (params, opt_state),
                        idx)

  @jax.jit
  def one_step(params, opt_state, idx, xs, ys):
    return body((params, opt_state), idx, xs, ys)

  rng = np.random.default_rng([seed, 7])
  order = np.concatenate([rng.permutation(n) for _ in range(
      math.ceil(program.steps * program.batch_size / n) + 1)])
  order = order[:program.steps * program.batch_size].reshape(
      program.steps, program.batch_size)
  losses = []
  start = time.time()
  for begin in range(0, program.steps, chunk if program.scan else 1):
    if program.scan:
      idx = jnp.asarray(order[begin:begin + chunk])
      (params, opt_state), chunk_losses = scan_chunk(
          params, opt_state, idx, x_train, y_train)
    else:
      (params, opt_state), chunk_losses = one_step(
          params, opt_state, jnp.asarray(order[begin]), x_train, y_train)
      chunk_losses = chunk_losses[None]
    losses.append(np.asarray(chunk_losses))
  losses = np.concatenate(losses)
  seconds = time.time() - start

  @jax.jit
  def correct(params, x, y):
    return jnp.sum(jnp.argmax(net.apply(params, x), -1) == y)

  right = sum(int(correct(params, x_test[i:i + 1000], y_test[i:i + 1000]))
              for i in range(0, x_test.shape[0], 1000))
  tail = losses[-max(1, program.steps // 10):]
  final_loss = float(np.mean(tail))
  diverged = bool(not np.all(np.isfinite(losses))
                  or final_loss > untrained)
  return dict(seed=seed, test_accuracy=100.0 * right / x_test.shape[0],
              train_loss=final_loss if math.isfinite(final_loss) else None,
              diverged=diverged, seconds=round(seconds, 1))


def bnp_factory(kind, rate, options):
  def make(specs):
    base = base_optimizer(kind, rate)
    if options is None:
      return base
    return optax.chain(
        bnp_optax.scale_by_bnp(layer_specs=specs, **options), base)
  return make


def _save_record(path: pathlib.Path, header: dict, method: str, desc: str,
                 rate: float, record: dict) -> None:
  """Adds one run to ``path``, re-read first: several processes may share it."""
  out = json.loads(path.read_text()) if path.exists() else dict(header)
  out.update({k: v for k, v in header.items() if k != 'runs'})
  out.setdefault('runs', {})
  records = [r for r in out['runs'].get(method, {}).get('seeds', [])
             if r['seed'] != record['seed']] + [record]
  out['runs'][method] = dict(description=desc, rate=rate,
                             seeds=sorted(records, key=lambda r: r['seed']))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f'.tmp{os.getpid()}')
  tmp.write_text(json.dumps(out, indent=1) + '\n')
  os.replace(tmp, path)


def run_program(name: str, seeds, data_dir, only=None) -> None:
  """Trains the runs of ``name`` not yet in its JSON, seed by seed."""
  program = PROGRAMS[name]
  data = load_data(program, data_dir)
  net = program.net()
  header = dict(program=name, label=program.label, dataset=program.dataset,
                batch_size=program.batch_size, steps=program.steps,
                optimizer=program.optimizer, rate=program.rate,
                train_subset=program.train_subset, note=program.note,
                command=f'python benchmarks/graft_study.py run {name} '
                '--data-dir DATA', runs={})
  path = OUT / f'{name}.json'
  for seed in seeds:
    for method, (desc, rate, options) in methods(program).items():
      if only and method not in only:
        continue
      runs = json.loads(path.read_text())['runs'] if path.exists() else {}
      if seed in {r['seed'] for r in runs.get(method, {}).get('seeds', [])}:
        continue
      record = train(program, net,
                     bnp_factory(program.optimizer, rate, options), seed,
                     data)
      print(name, method, rate, record, flush=True)
      _save_record(path, header, method, desc, rate, record)


def run_sizes(name: str, seeds, data_dir) -> dict:
  program = PROGRAMS[name]
  data = load_data(program, data_dir)
  net = program.net()
  path = OUT / f'sizes-{name}.json'
  out = dict(program=name, label=program.label, rate=program.rate,
             optimizer=program.optimizer, batch_size=program.batch_size,
             steps=program.steps,
             command=f'python benchmarks/graft_study.py sizes {name} '
             f'--seeds {",".join(map(str, seeds))} --data-dir DATA',
             runs={})
  if path.exists():
    out['runs'] = json.loads(path.read_text())['runs']
  for mode in SIZE_MODES:
    records = out['runs'].get(mode, [])
    done = {r['seed'] for r in records}
    for seed in seeds:
      if seed in done:
        continue

      def make(specs, mode=mode):
        del specs
        return optax.chain(sized_bnp(mode),
                           base_optimizer(program.optimizer, program.rate))

      record = train(program, net, make, seed, data)
      records.append(record)
      print(name, mode, record, flush=True)
      out['runs'][mode] = sorted(records, key=lambda r: r['seed'])
      OUT.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(out, indent=1) + '\n')
  return out


# ----------------------------------------------------------------- tables


def _cell(records) -> str:
  accs = [r['test_accuracy'] for r in records]
  bad = sum(r['diverged'] for r in records)
  text = f'{np.mean(accs):.2f}'
  if len(accs) > 1:
    text += f' ({min(accs):.2f}-{max(accs):.2f})'
  else:
    text += ' (1 seed)'
  if bad:
    text += f', {bad}/{len(accs)} diverged'
  return text


def _rate(rate: float) -> str:
  return f'{rate:g}'


PROGRAM_ORDER = tuple(PROGRAMS)


def results_table(directory=OUT) -> str:
  """Test accuracy %, mean (min-max) over seeds, per program and method."""
  lines = [
      '| program | baseline at its rate | BNP graft at that rate | '
      "BNP at that rate | BNP at 10x | BNP at the paper's rate | "
      'seeds, cut |',
      '| --- | --- | --- | --- | --- | --- | --- |']
  for name in PROGRAM_ORDER:
    path = pathlib.Path(directory) / f'{name}.json'
    if not path.exists():
      continue
    data = json.loads(path.read_text())
    runs = data['runs']

    def cell(method, runs=runs):
      if method not in runs:
        return ''
      return f'{_cell(runs[method]["seeds"])} at {_rate(runs[method]["rate"])}'

    seeds = max(len(r['seeds']) for r in runs.values())
    base = f'{data["optimizer"]} ' + cell('baseline')
    lines.append(
        f'| {data["label"]} | {base} | {cell("bnp_graft")} | {cell("bnp")} '
        f'| {cell("bnp_10x")} | {cell("bnp_paper")} | {seeds}, '
        f'{data["note"]} |')
  return '\n'.join(lines)


def sizes_table(directory=OUT) -> str:
  """Test accuracy % of each size matching, per program, and the baseline's.

  The baseline column is the ``run`` command's (all its seeds).
  """
  header = ('| program (rate) | baseline | ' + ' | '.join(SIZE_MODES) + ' |')
  lines = [header, '| --- | --- |' + ' --- |' * len(SIZE_MODES)]
  for name in PROGRAM_ORDER:
    path = pathlib.Path(directory) / f'sizes-{name}.json'
    if not path.exists():
      continue
    data = json.loads(path.read_text())
    main = pathlib.Path(directory) / f'{name}.json'
    baseline = (json.loads(main.read_text())['runs'].get('baseline')
                if main.exists() else None)
    cells = [_cell(baseline['seeds']) if baseline else '']
    cells += [_cell(data['runs'][m]) if m in data['runs'] else ''
              for m in SIZE_MODES]
    lines.append(f'| {data["label"]} ({data["optimizer"]} '
                 f'{_rate(data["rate"])}) | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


PAGE = ROOT / 'docs' / 'howto' / 'learning_rate.md'
MARKERS = {
    'results': ('<!-- graft-results: benchmarks/graft_study.py table -->',
                '<!-- /graft-results -->'),
    'sizes': ('<!-- graft-sizes: benchmarks/graft_study.py table -->',
              '<!-- /graft-sizes -->'),
}


def rendered(directory=OUT) -> dict[str, str]:
  return {'results': results_table(directory),
          'sizes': sizes_table(directory)}


def page_tables(text: str) -> dict[str, str]:
  """The tables between the markers of the learning-rate page."""
  found = {}
  for name, (begin, end) in MARKERS.items():
    if begin in text and end in text:
      found[name] = text.split(begin, 1)[1].split(end, 1)[0].strip()
  return found


def write_page(directory=OUT, page=PAGE) -> None:
  text = page.read_text()
  for name, table in rendered(directory).items():
    begin, end = MARKERS[name]
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f'{head}{begin}\n{table}\n{end}{tail}'
  page.write_text(text)


def check_page(directory=OUT, page=PAGE) -> int:
  """0 when the page's tables are what the JSON gives, else 1."""
  want, got = rendered(directory), page_tables(page.read_text())
  bad = [name for name in want if got.get(name) != want[name]]
  for name in bad:
    print(f'{page}: the {name} table differs from {directory}; run '
          '`python benchmarks/graft_study.py table --write`')
  return 1 if bad else 0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  for command in ('run', 'sizes'):
    p = sub.add_parser(command)
    p.add_argument('program', choices=sorted(PROGRAMS))
    p.add_argument('--seeds', default=None,
                   help="comma-separated seeds (default: the program's)")
    p.add_argument('--data-dir', default=None)
    if command == 'run':
      p.add_argument('--methods', default=None,
                     help='comma-separated subset of the methods')
  p = sub.add_parser('table')
  p.add_argument('directory', nargs='?', default=str(OUT))
  p.add_argument('--write', action='store_true',
                 help='write the tables into docs/howto/learning_rate.md')
  p.add_argument('--check', action='store_true',
                 help='exit 1 unless the page holds these tables')
  args = parser.parse_args(argv)
  if args.command == 'table':
    if args.check:
      return check_page(args.directory)
    if args.write:
      write_page(args.directory)
    for table in rendered(args.directory).values():
      print(table)
      print()
    return 0
  program = PROGRAMS[args.program]
  seeds = (tuple(int(s) for s in args.seeds.split(','))
           if args.seeds else program.seeds)
  if args.command == 'run':
    only = set(args.methods.split(',')) if args.methods else None
    run_program(args.program, seeds, args.data_dir, only)
  else:
    run_sizes(args.program, seeds, args.data_dir)
  return 0


if __name__ == '__main__':
  sys.exit(main())
