"""Tracing capture vs the linen interceptor: step time and compile time.

Run from the repository root::

  python benchmarks/bench_tracing.py                   # fc60 and cnn32
  python benchmarks/bench_tracing.py --cases fc60 --steps 500 --out r.json

The same Flax model (``bench_models.FC`` / ``CNN5``) and the same BNP + SGD
step, with the layer statistics taken either by ``bnp_optax.linen.apply``
(module interception) or by ``bnp_optax.tracing.apply`` (the model's jaxpr
evaluated by an interpreter). Both steps are jit-compiled with the state
donated; reported per variant:

- step time: median, 10th and 90th percentile over ``--steps`` rounds run
  interleaved (A B, B A, ...), and ``tracing/linen``, the median of the
  per-round ratios (paired, so drifts of a shared machine cancel);
- compile time: tracing + lowering (``jit(f).lower``, which includes the
  tracing capture's own trace of the model and its interpretation) and XLA
  compilation (``.compile()``), median over ``--compile-reps`` fresh
  compilations (``jax.clear_caches()`` before each), with their paired
  ratios.

This is a benchmark, not a test: it asserts nothing about time.
"""

import argparse
import json
import os
import platform
import statistics as pystats
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_models
import bnp_optax
import bnp_optax.linen
import bnp_optax.tracing

CASES = {
    'fc60': (bench_models.FC, (784,), 60),
    'cnn32': (bench_models.CNN5, (32, 32, 3), 32),
}


def make_step(model, params, x, variant):
  fn = lambda p, x: model.apply({'params': p}, x)
  if variant == 'linen':
    capture = lambda p, x: bnp_optax.linen.apply(model, {'params': p}, x)
    tx = bnp_optax.bnp(1e-3)
  else:
    capture = lambda p, x: bnp_optax.tracing.apply(fn, p, x)
    tx = bnp_optax.bnp(1e-3, layer_specs=bnp_optax.tracing.layer_specs(
        fn, params, x))

  def step(state, x, y):
    params, opt_state = state

    def loss_fn(p):
      logits, stats = capture(p, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   layer_stats=stats)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step, (params, tx.init(params))


def run_case(name, *, steps, warmup, compile_reps, seed=0):
  model_cls, in_shape, batch = CASES[name]
  model = model_cls()
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, *in_shape), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, 10)
  params = model.init(kp, x)['params']
  variants = ('linen', 'tracing')
  steps_fns, states = {}, {}
  for v in variants:
    steps_fns[v], states[v] = make_step(model, params, x, v)

  lower_s = {v: [] for v in variants}
  compile_s = {v: [] for v in variants}
  for _ in range(compile_reps):
    for v in variants:
      jax.clear_caches()
      fn = jax.jit(steps_fns[v], donate_argnums=0)
      t0 = time.perf_counter()
      lowered = fn.lower(states[v], x, y)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      lower_s[v].append(t1 - t0)
      compile_s[v].append(t2 - t1)

  jitted = {v: jax.jit(steps_fns[v], donate_argnums=0) for v in variants}
  state = {v: jax.tree.map(jnp.array, states[v]) for v in variants}
  for _ in range(warmup):
    for v in variants:
      state[v], loss = jitted[v](state[v], x, y)
      jax.block_until_ready((state[v], loss))
  times = {v: [] for v in variants}
  for i in range(steps):
    order = variants if i % 2 == 0 else variants[::-1]
    for v in order:
      t0 = time.perf_counter()
      state[v], loss = jitted[v](state[v], x, y)
      jax.block_until_ready((state[v], loss))
      times[v].append(time.perf_counter() - t0)

  def paired(a, b):
    return pystats.median(x / y for x, y in zip(a, b))

  result = {'case': name, 'batch_size': batch, 'variants': {}}
  for v in variants:
    ts = sorted(times[v])
    result['variants'][v] = {
        'median_ms': 1e3 * pystats.median(ts),
        'p10_ms': 1e3 * ts[len(ts) // 10],
        'p90_ms': 1e3 * ts[(9 * len(ts)) // 10],
        'lower_s': pystats.median(lower_s[v]),
        'compile_s': pystats.median(compile_s[v]),
        # 1: traced once, no retrace per step.
        'jit_cache_size': jitted[v]._cache_size(),
    }
  result['tracing/linen'] = {
      'step': paired(times['tracing'], times['linen']),
      'lower': paired(lower_s['tracing'], lower_s['linen']),
      'compile': paired(compile_s['tracing'], compile_s['linen']),
  }
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', nargs='+', default=list(CASES),
                      choices=list(CASES))
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--warmup', type=int, default=20)
  parser.add_argument('--compile-reps', type=int, default=5)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  info = {'platform': device.platform, 'device_kind': device.device_kind,
          'jax': jax.__version__, 'machine': platform.machine()}
  results = [
      run_case(c, steps=args.steps, warmup=args.warmup,
               compile_reps=args.compile_reps)
      for c in args.cases
  ]
  print(f"{info['device_kind']} ({info['platform']}), jax {info['jax']}")
  print(f"{'case':8} {'variant':8} {'step ms (p10-p90)':>24} "
        f"{'lower s':>8} {'compile s':>9}")
  for r in results:
    for v, m in r['variants'].items():
      spread = f"{m['median_ms']:.3f} ({m['p10_ms']:.3f}-{m['p90_ms']:.3f})"
      print(f"{r['case']:8} {v:8} {spread:>24} {m['lower_s']:8.3f} "
            f"{m['compile_s']:9.3f}")
    q = r['tracing/linen']
    print(f"{r['case']:8} tracing/linen (median of paired ratios): step "
          f"{q['step']:.3f}, lower {q['lower']:.3f}, compile "
          f"{q['compile']:.3f}")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'device': info, 'results': results}, f, indent=1)
  return results


if __name__ == '__main__':
  main()
