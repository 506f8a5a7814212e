"""Times one jit-compiled training step: SGD vs BNP + SGD vs BatchNorm + SGD.

Run from the repository root::

  python benchmarks/bench_step.py                      # FC and CNN cases
  python benchmarks/bench_step.py --cases fc60 cnn128 --steps 500
  python benchmarks/bench_step.py --cases resnet      # meant for a GPU
  python benchmarks/bench_step.py --cases vit --variants sgd bnp adamw bnp_adamw
  python benchmarks/bench_step.py --out results.json --hlo-dir hlo/

For every case, each variant's step (forward, backward, optimizer update,
``optax.apply_updates``; parameters and optimizer state donated) is compiled
once, warmed up, and then the variants are run interleaved, one step each in
a rotating order (A B C, B C A, C A B, ...), with ``jax.block_until_ready``
on all the outputs of every step, so that slow drifts of a shared machine hit
all variants alike. Every variant sees the same input batch. Reported:

- median, 10th and 90th percentile of the step time;
- ``BNP/SGD`` and ``BNP/BN``: the ratio of the medians, and the median of the
  per-round ratios (paired, the less noisy of the two), of the wall time and
  of the process CPU time (``time.process_time``, all threads), which other
  jobs on a shared machine disturb much less;
- compile time: tracing + lowering (``jit(f).lower``) and XLA compilation
  (``.compile()``) timed separately, and the process CPU time of both,
  median over ``--compile-reps`` fresh compilations (``jax.clear_caches()``
  before each);
- memory: XLA's buffer assignment for the compiled step
  (``compiled.memory_analysis()``: arguments, outputs, aliased (donated)
  bytes, temporaries); ``peak_bytes = argument + output - alias + temp`` is
  the most memory the step's buffers can hold at once. It is computed by the
  compiler, not measured, and is the same on every run;
- XLA's cost model (``compiled.cost_analysis()``: flops, bytes accessed) and
  the kernels of the optimized HLO (top-level fusions and other ops);
- the size of BNP's optimizer state, checked to be two vectors of the
  layer's fan-in features (input channels for a convolution) per
  preconditioned layer.

This is a benchmark, not a test: it asserts nothing about time.
"""

import argparse
from collections import Counter
from collections.abc import Callable
import dataclasses
import functools
import json
import math
import os
import platform
import re
import statistics as pystats
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_models
import bnp_optax
from bnp_optax.experiments import cross_entropy

LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: Callable[..., Any]
  input_shape: tuple[int, ...]  # without the batch axis
  batch_size: int
  default_steps: int


def _cases(on_gpu: bool, resnet_batch: int | None) -> dict[str, Case]:
  fc, cnn, resnet = bench_models.FC, bench_models.CNN5, bench_models.ResNet18
  if resnet_batch is None:
    resnet_batch = 128 if on_gpu else 4
  wide = lambda width: functools.partial(fc, hidden=(width,) * 3)
  same = functools.partial(cnn, padding='SAME')
  fc2 = functools.partial(fc, hidden=(100, 100))
  cases = [
      Case('fc1', fc, (784,), 1, 2000),
      Case('fc8', fc, (784,), 8, 2000),
      Case('fc60', fc, (784,), 60, 2000),
      Case('fc512', fc, (784,), 512, 1000),
      Case('fc60w400', wide(400), (784,), 60, 1000),
      Case('fc60w1600', wide(1600), (784,), 60, 200),
      Case('fc60w4096', wide(4096), (784,), 60, 60),
      # Table 1 of the paper: Figure 8's network (two hidden layers of 100)
      # on CIFAR-10-shaped inputs at the batch sizes of its Figure 9.
      Case('table1-bs16', fc2, (3072,), 16, 2000),
      Case('table1-bs256', fc2, (3072,), 256, 500),
      Case('table1-bs512', fc2, (3072,), 512, 300),
      Case('cnn2', cnn, (32, 32, 3), 2, 1000),
      Case('cnn16', cnn, (32, 32, 3), 16, 500),
      Case('cnn128', cnn, (32, 32, 3), 128, 200),
      Case('cnn256', cnn, (32, 32, 3), 256, 60),
      Case('cnn128same', same, (32, 32, 3), 128, 100),
      Case('resnet18', resnet, (32, 32, 3), 32, 10),
      Case('resnet', resnet, (32, 32, 3), resnet_batch, 100 if on_gpu else 3),
      # The ViT of docs/transformers.md (LayerNorm in every variant).
      Case('vit128', bench_models.ViT, (32, 32, 3), 128, 30),
  ]
  # Depth: compile time and kernels as the number of layers grows.
  for depth in (10, 50, 100, 300):
    cases.append(Case(
        f'mlp{depth}', functools.partial(bench_models.DeepMLP, depth=depth),
        (32,), 32, 200))
  for depth in (20, 56, 110):
    cases.append(Case(
        f'resnet{depth}',
        functools.partial(bench_models.CifarResNet, depth=depth),
        (32, 32, 3), 16, 5))
  return {c.name: c for c in cases}


GROUPS = {
    'fc': ['fc1', 'fc60', 'fc512'],
    'cnn': ['cnn2', 'cnn128'],
    'default': ['fc1', 'fc60', 'fc512', 'cnn2', 'cnn128'],
    'all': ['fc1', 'fc60', 'fc512', 'cnn2', 'cnn128', 'resnet'],
    # BNP's overhead as the work grows: MLP width, batch size, CNN batch.
    'scaling': ['fc60', 'fc60w400', 'fc60w1600', 'fc60w4096', 'fc1', 'fc8',
                'fc512', 'cnn2', 'cnn16', 'cnn128', 'cnn256'],
    # The cases of the performance issue: large feature maps, ResNet-18.
    'targets': ['cnn128', 'cnn128same', 'resnet18', 'fc60w4096'],
    'table1': ['table1-bs16', 'table1-bs256', 'table1-bs512'],
    # Compile time and kernel counts against depth (MLP width 32, batch 32;
    # CIFAR ResNets, batch 16).
    'depth': ['mlp10', 'mlp50', 'mlp100', 'mlp300', 'resnet20', 'resnet56',
              'resnet110'],
    'vit': ['vit128'],
}


# A variant is a function (case, params_vanilla, params_bn) returning the
# step function and its initial state; step(state, x, y) -> (state, loss).
def sgd_variant(case, vanilla, bn_vars, tx=None):
  del bn_vars
  model = case.model(batch_norm=False)
  tx = tx or optax.sgd(LEARNING_RATE)

  def step(state, x, y):
    params, opt_state = state
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(model.apply({'params': p}, x), y)
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step, (vanilla, tx.init(vanilla))


def bnp_variant(case, vanilla, bn_vars, base=None):
  """BNP + SGD, or BNP chained before ``base`` (e.g. AdamW)."""
  del bn_vars
  model = case.model(batch_norm=False)
  # Layouts up front: needed for DenseGeneral kernels (the ViT's attention).
  specs = bnp_optax.linen.layer_specs(
      model, {'params': vanilla},
      jax.ShapeDtypeStruct((case.batch_size, *case.input_shape), jnp.float32))
  tx = (bnp_optax.bnp(LEARNING_RATE, layer_specs=specs) if base is None else
        optax.chain(bnp_optax.scale_by_bnp(layer_specs=specs), base))

  def step(state, x, y):
    params, opt_state = state

    def loss_fn(p):
      logits, layer_stats = bnp_optax.linen.apply(model, {'params': p}, x)
      return cross_entropy(logits, y), layer_stats

    (loss, layer_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=layer_stats
    )
    return (optax.apply_updates(params, updates), opt_state), loss

  return step, (vanilla, tx.init(vanilla))


def sgd_stats_variant(case, vanilla, bn_vars):
  """SGD that also takes BNP's statistics and returns them, unused.

  For attribution: ``sgdstats - sgd`` is what capturing the statistics
  costs, ``bnp - sgdstats`` the running averages and the preconditioning.
  """
  del bn_vars
  model = case.model(batch_norm=False)
  tx = optax.sgd(LEARNING_RATE)

  def step(state, x, y):
    params, opt_state = state

    def loss_fn(p):
      logits, layer_stats = bnp_optax.linen.apply(model, {'params': p}, x)
      return cross_entropy(logits, y), layer_stats

    (loss, layer_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (
        loss, layer_stats)

  return step, (vanilla, tx.init(vanilla))


def bn_variant(case, vanilla, bn_vars):
  del vanilla
  model = case.model(batch_norm=True)
  tx = optax.sgd(LEARNING_RATE)
  params, batch_stats = bn_vars['params'], bn_vars['batch_stats']

  def step(state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, mutated = model.apply(
          {'params': p, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
      )
      return cross_entropy(logits, y), mutated['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, batch_stats, opt_state), loss

  return step, (params, batch_stats, tx.init(params))


VARIANTS: dict[str, Callable[..., Any]] = {
    'sgd': sgd_variant,
    'bnp': bnp_variant,
    'bn': bn_variant,
    'sgdstats': sgd_stats_variant,
    'adamw': functools.partial(sgd_variant, tx=optax.adamw(LEARNING_RATE)),
    'bnp_adamw': functools.partial(bnp_variant,
                                   base=optax.adamw(LEARNING_RATE)),
}


# ------------------------------------------------------------------ HLO


_SKIP_OPS = {
    'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
}


def _opcode(line: str) -> str | None:
  m = re.match(r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$', line)
  if not m:
    return None
  rest = m.group(1)
  if rest.startswith('('):  # tuple shape: skip to the matching paren
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        rest = rest[i + 1 :]
        break
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  m = re.match(r'\s*([a-z][\w\-]*)\(', rest)
  return m.group(1) if m else None


def hlo_summary(text: str) -> dict[str, Any]:
  """Counts the top-level ops (kernels) of the ENTRY computation."""
  entry, inside = [], False
  for line in text.splitlines():
    if line.startswith('ENTRY'):
      inside = True
      continue
    if inside:
      if line.startswith('}'):
        break
      entry.append(line)
  ops = Counter(op for op in map(_opcode, entry) if op)
  kernels = {k: v for k, v in ops.items() if k not in _SKIP_OPS}
  return {
      'fusions': ops.get('fusion', 0),
      'kernels': sum(kernels.values()),
      'ops': dict(sorted(kernels.items())),
  }


# ------------------------------------------------------------------ bench


def _float_count(tree) -> int:
  return sum(
      int(np.prod(x.shape))
      for x in jax.tree_util.tree_leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
  )


def _expected_bnp_floats(params, specs=None) -> int:
  """Two vectors of fan-in features per layer with a kernel of ndim >= 2.

  ``specs`` (``{layer path: LayerSpec}``) give the fan-in of kernels that
  are not Dense/Conv kernels (DenseGeneral).
  """
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    layer = '/'.join(str(getattr(k, 'key', k)) for k in path[:-1])
    spec = (specs or {}).get(layer)
    if (getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim >= 2
        and spec is not None and leaf.ndim > 2 and not spec.spatial_axes):
      axes = spec.independent_axes + spec.fan_in_axes
      total += 2 * math.prod(leaf.shape[a] for a in axes)
    elif getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim >= 2:
      total += 2 * (leaf.shape[0] if leaf.ndim == 2 else leaf.shape[-2])
  return total


def _layer_count(params) -> int:
  """The layers BNP preconditions: kernels of ndim >= 2."""
  return sum(
      1 for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      if getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim >= 2)


def _copy(tree):
  return jax.tree_util.tree_map(jnp.array, tree)


def _memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  out = {
      k: int(getattr(m, f'{k}_size_in_bytes'))
      for k in ('argument', 'output', 'alias', 'temp', 'generated_code')
  }
  out['peak_bytes'] = (
      out['argument'] + out['output'] - out['alias'] + out['temp']
  )
  return out


def _cost(compiled) -> dict[str, float]:
  try:
    c = compiled.cost_analysis()
  except Exception:
    return {}
  if isinstance(c, list):
    c = c[0] if c else {}
  return {k: float(c[k]) for k in ('flops', 'bytes accessed') if k in c}


def case_inputs(case, seed: int = 0):
  """A case's batch ``(x, y)``, vanilla parameters and BatchNorm variables.

  The same initial parameters for every variant, from ``seed``.
  """
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (case.batch_size, *case.input_shape), jnp.float32)
  y = jax.random.randint(ky, (case.batch_size,), 0, 10)
  vanilla = case.model(batch_norm=False).init(kp, x)['params']
  bn_vars = case.model(batch_norm=True).init(kp, x)
  return x, y, vanilla, bn_vars


def run_case(case, variants, *, steps, warmup, compile_reps, hlo_dir, seed):
  x, y, vanilla, bn_vars = case_inputs(case, seed)

  steps_fns, states, jitted = {}, {}, {}
  for name in variants:
    step, state = VARIANTS[name](case, vanilla, bn_vars)
    steps_fns[name] = step
    states[name] = state
    jitted[name] = jax.jit(step, donate_argnums=0)

  # Compile time: fresh traces and compilations, interleaved.
  lower_s = {n: [] for n in variants}
  compile_s = {n: [] for n in variants}
  compile_cpu_s = {n: [] for n in variants}
  compiled = {}
  for _ in range(compile_reps):
    for name in variants:
      jax.clear_caches()
      fn = jax.jit(steps_fns[name], donate_argnums=0)
      t0, c0 = time.perf_counter(), time.process_time()
      lowered = fn.lower(states[name], x, y)
      t1 = time.perf_counter()
      compiled[name] = lowered.compile()
      t2, c2 = time.perf_counter(), time.process_time()
      lower_s[name].append(t1 - t0)
      compile_s[name].append(t2 - t1)
      compile_cpu_s[name].append(c2 - c0)

  result = {'case': case.name, 'batch_size': case.batch_size,
            'input_shape': list(case.input_shape),
            'layers': _layer_count(vanilla), 'variants': {}}
  for name in variants:
    c = compiled[name]
    text = c.as_text()
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      path = os.path.join(hlo_dir, f'{case.name}_{name}.hlo.txt')
      with open(path, 'w') as f:
        f.write(text)
    opt_state = states[name][-1]
    result['variants'][name] = {
        'lower_s': pystats.median(lower_s[name]),
        'compile_s': pystats.median(compile_s[name]),
        # Process CPU time of lowering + compiling: on a shared machine the
        # wall time also counts the waits for a core.
        'compile_cpu_s': pystats.median(compile_cpu_s[name]),
        'memory': _memory(c),
        'cost': _cost(c),
        'hlo': hlo_summary(text),
        'opt_state_floats': _float_count(opt_state),
        'param_floats': _float_count(states[name][0]),
    }
    if name not in ('sgd', 'bn', 'sgdstats', 'adamw', 'bnp_adamw'):  # BNP
      expected = _expected_bnp_floats(vanilla, bnp_optax.linen.layer_specs(
          case.model(batch_norm=False), {'params': vanilla}, x))
      got = _float_count(opt_state)
      result['variants'][name]['opt_state_expected_floats'] = expected
      assert got == expected, (
          f'{name}: optimizer state holds {got} floats, expected 2 * sum '
          f'n_in = {expected}'
      )

  # Run: fresh copies of the state (donated from here on), warm-up, rounds.
  live = {n: _copy(states[n]) for n in variants}
  for _ in range(warmup):
    for name in variants:
      live[name], loss = jitted[name](live[name], x, y)
      jax.block_until_ready((live[name], loss))
  times = {n: [] for n in variants}
  cpu_times = {n: [] for n in variants}
  order = list(variants)
  for r in range(steps):
    rot = order[r % len(order):] + order[: r % len(order)]
    for name in rot:
      t0, c0 = time.perf_counter(), time.process_time()
      live[name], loss = jitted[name](live[name], x, y)
      jax.block_until_ready((live[name], loss))
      times[name].append(time.perf_counter() - t0)
      cpu_times[name].append(time.process_time() - c0)
  for name in variants:
    t = np.asarray(times[name])
    v = result['variants'][name]
    v['median_ms'] = float(np.median(t) * 1e3)
    v['cpu_median_ms'] = float(np.median(cpu_times[name]) * 1e3)
    v['p10_ms'] = float(np.percentile(t, 10) * 1e3)
    v['p90_ms'] = float(np.percentile(t, 90) * 1e3)
    # One trace and compilation for all the steps: no per-step Python work
    # beyond the dispatch of one executable.
    v['jit_cache_size'] = int(jitted[name]._cache_size())
  result['ratios'] = _ratios(times, result['variants'], cpu_times)
  for q in result['ratios'].values():
    if isinstance(q, dict):
      q['kernels_added_per_layer'] = q['kernels_added'] / result['layers']
  return result


def _ratios(times, v, cpu_times=None) -> dict[str, Any]:
  out = {}
  names = list(times)
  for a in names:
    for b in names:
      if a == b or b not in ('sgd', 'bn', 'adamw') or (
          a == 'sgd' and b == 'bn') or (b == 'adamw' and a != 'bnp_adamw'):
        continue
      ta, tb = np.asarray(times[a]), np.asarray(times[b])
      out[f'{a}/{b}'] = {
          'of_medians': float(np.median(ta) / np.median(tb)),
          'paired': float(np.median(ta / tb)),
          'of_p10': float(np.percentile(ta, 10) / np.percentile(tb, 10)),
          # Process CPU time (all threads) of the step: what the other jobs
          # of a shared machine disturb least.
          'paired_cpu': float(np.median(
              np.asarray(cpu_times[a]) / np.asarray(cpu_times[b])))
          if cpu_times else math.nan,
          'compile': (v[a]['lower_s'] + v[a]['compile_s'])
          / (v[b]['lower_s'] + v[b]['compile_s']),
          'compile_cpu': v[a]['compile_cpu_s'] / v[b]['compile_cpu_s'],
          'kernels_added': v[a]['hlo']['kernels'] - v[b]['hlo']['kernels'],
      }
  if {'sgd', 'bn'} <= set(names):
    bn_over = v['bn']['median_ms'] - v['sgd']['median_ms']
    for a in names:
      if a not in ('sgd', 'bn'):
        over = v[a]['median_ms'] - v['sgd']['median_ms']
        out[f'{a}_overhead_vs_bn_overhead'] = (
            over / bn_over if bn_over > 0 else math.inf
        )
  return out


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {
      'platform': d.platform,
      'device_kind': d.device_kind,
      'device_count': jax.device_count(),
      'cpu': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
      'jax': jax.__version__,
      'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else '',
      'python': platform.python_version(),
      'bnp_optax': os.path.dirname(bnp_optax.__file__),
  }


def print_table(results, info) -> None:
  print(f"\ndevice: {info['platform']} ({info['device_kind']}), "
        f"{info['cpu_count']} CPU cores, jax {info['jax']}")
  head = (f"{'case':<13}{'variant':<12}{'median ms':>11}{'p10-p90 ms':>17}"
          f"{'/sgd':>7}{'lower s':>9}{'compile s':>10}{'peak MB':>9}"
          f"{'kernels':>8}{'fusions':>8}{'MFLOP':>9}")
  print(head)
  print('-' * len(head))
  for r in results:
    sgd = r['variants'].get('sgd')
    for name, v in r['variants'].items():
      ratio = v['median_ms'] / sgd['median_ms'] if sgd else float('nan')
      mem = v['memory']['peak_bytes'] / 2**20 if v['memory'] else float('nan')
      flops = v['cost'].get('flops', float('nan')) / 1e6
      print(f"{r['case']:<13}{name:<12}{v['median_ms']:>11.4f}"
            f"{v['p10_ms']:>8.4f}-{v['p90_ms']:<8.4f}{ratio:>7.3f}"
            f"{v['lower_s']:>9.3f}{v['compile_s']:>10.3f}{mem:>9.2f}"
            f"{v['hlo']['kernels']:>8}{v['hlo']['fusions']:>8}{flops:>9.2f}")
    for k, q in r['ratios'].items():
      if isinstance(q, dict):
        print(f"{'':<13}{k:<20} median ratio {q['of_medians']:.3f}, paired "
              f"{q['paired']:.3f}, p10 {q['of_p10']:.3f}, CPU time paired "
              f"{q['paired_cpu']:.3f}, compile {q['compile']:.2f} (CPU "
              f"time {q['compile_cpu']:.2f}), kernels "
              f"{q['kernels_added']:+d} ({q['kernels_added_per_layer']:+.1f} "
              f"per layer of {r['layers']})")
      else:
        print(f"{'':<13}{k:<20} {q:.3f}")
    print()


def main(argv=None) -> dict[str, Any]:
  on_gpu = jax.default_backend() == 'gpu'
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--cases', nargs='+', default=['default'],
                 help='case names (see _cases) or groups (fc, cnn, default, '
                 'all, scaling, targets, table1, depth)')
  p.add_argument('--variants', nargs='+', default=['sgd', 'bnp', 'bn'],
                 help=f'any of {sorted(VARIANTS)}')
  p.add_argument('--steps', type=int, default=None,
                 help='timed rounds (one step of every variant each); '
                 'default per case')
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--compile-reps', type=int, default=3)
  p.add_argument('--resnet-batch', type=int, default=None,
                 help='batch of the resnet case (default 128 on GPU, 4 on CPU)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='write the results as JSON')
  p.add_argument('--hlo-dir', default=None,
                 help='write the optimized HLO of every step here')
  args = p.parse_args(argv)

  cases = _cases(on_gpu, args.resnet_batch)
  names = []
  for c in args.cases:
    for n in GROUPS.get(c, [c]):
      if n not in cases:
        p.error(f'unknown case {n!r}')
      if n not in names:
        names.append(n)
  for v in args.variants:
    if v not in VARIANTS:
      p.error(f'unknown variant {v!r}; known: {sorted(VARIANTS)}')

  info = device_info()
  print(f"device: {info['platform']} ({info['device_kind']}); bnp_optax "
        f"from {info['bnp_optax']}", flush=True)
  results = []
  for n in names:
    case = cases[n]
    steps = args.steps if args.steps is not None else case.default_steps
    print(f'{n}: batch {case.batch_size}, {steps} rounds ...', flush=True)
    results.append(run_case(
        case, args.variants, steps=steps, warmup=args.warmup,
        compile_reps=args.compile_reps, hlo_dir=args.hlo_dir, seed=args.seed,
    ))
    out = {'device': info, 'args': vars(args), 'results': results}
    if args.out:  # after every case, so that a run cut short keeps them
      with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
  print_table(results, info)
  if args.out:
    print(f'wrote {args.out}')
  return out


if __name__ == '__main__':
  main()
