"""Every route that merges statistics keeps a large mean's variance.

A layer applied to several slices of a batch (the steps of a scan, a module
called more than once, the micro-steps of ``multi_steps``, the devices of a
sharded batch) gets the statistics of all its inputs taken together. With
feature means 1e6 and spreads 1, 2, 3, float32 holds each mean only to a few
hundredths of the spread, so a merge that adds the spread of the slices'
rounded means instead of their exact deviations (the residual) is off by
tenths of a percent. Each route is held against float64 NumPy over the
float32 inputs, to what float32 can hold: the mean to one unit in the last
place, the variance to a few parts in a million.
"""

import functools

from flax import nnx
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import bnp_optax

STEPS, ROWS, FEATURES = 4, 64, 3


def _slices() -> jax.Array:
  """``(steps, rows, 3)`` float32, means 1e6 and spreads 1, 2, 3.

  Each slice is offset by a fraction of the spread, so that the spread of
  the slices' means is a visible part of the merged variance.
  """
  rng = np.random.default_rng(0)
  spread = np.array([1.0, 2.0, 3.0])
  offsets = rng.uniform(-1, 1, (STEPS, 1, FEATURES)) * spread
  x = 1e6 + offsets + spread * rng.standard_normal((STEPS, ROWS, FEATURES))
  return jnp.asarray(x, jnp.float32)


def _tracing_scan(xs):
  """A kernel closed over by a ``lax.scan`` body: one layer, every step."""
  params = {'w': jnp.ones((FEATURES, 2)), 'b': jnp.zeros(2)}

  def fn(p, xs):
    def body(carry, x):
      return carry, x @ p['w'] + p['b'][None]
    return lax.scan(body, 0.0, xs)[1]

  stats = jax.jit(lambda p: bnp_optax.tracing.apply(fn, p, xs)[1])(params)
  return stats['w']


def _tracing_shared(xs):
  """One kernel used by several dense layers (tied weights)."""
  params = {'w': jnp.ones((FEATURES, 2))}
  fn = lambda p, xs: [x @ p['w'] for x in xs]
  stats = jax.jit(lambda p: bnp_optax.tracing.apply(fn, p, xs)[1])(params)
  return stats['w']


class _Shared(nn.Module):
  @nn.compact
  def __call__(self, xs):
    dense = nn.Dense(2, name='shared')
    return [dense(x) for x in xs]


def _linen_shared(xs):
  """A linen module called on every slice."""
  model = _Shared()
  variables = model.init(jax.random.key(0), xs)
  stats = jax.jit(
      lambda v: bnp_optax.linen.apply(model, v, xs)[1])(variables)
  return stats['shared']


class _ScanStep(nn.Module):
  @nn.compact
  def __call__(self, carry, x):
    return carry, nn.Dense(2)(x)


class _ScanShared(nn.Module):
  """``nn.scan`` of a step whose parameters are shared by every step."""

  @nn.compact
  def __call__(self, xs):
    scan = nn.scan(_ScanStep, variable_broadcast='params',
                   split_rngs={'params': False})
    return scan(name='steps')(None, xs)[1]


def _tracing_nn_scan(xs):
  """A linen ``nn.scan`` with shared parameters, found by tracing."""
  model = _ScanShared()
  params = model.init(jax.random.key(0), xs)['params']
  fn = lambda p, xs: model.apply({'params': p}, xs)
  stats = jax.jit(lambda p: bnp_optax.tracing.apply(fn, p, xs)[1])(params)
  return stats['steps/Dense_0/kernel']


class _NNXShared(nnx.Module):
  def __init__(self):
    self.shared = nnx.Linear(FEATURES, 2, rngs=nnx.Rngs(0))

  def __call__(self, xs):
    return [self.shared(x) for x in xs]


def _nnx_shared(xs):
  """An NNX module called on every slice."""
  model = _NNXShared()
  stats = nnx.jit(lambda m: bnp_optax.nnx.apply(m, xs)[1])(model)
  return stats['shared']


def _multi_steps(xs):
  """The micro-steps of ``multi_steps``, read back from the running stats.

  With ``rho = 0`` the running statistics after the one optimizer step are
  the batch statistics the optimizer was given: those merged over the
  micro-steps.
  """
  params = {'Dense_0': {'kernel': jnp.zeros((FEATURES, 2))}}
  tx = bnp_optax.multi_steps(bnp_optax.scale_by_bnp(rho=0.0),
                             every_k_schedule=STEPS)
  state = tx.init(params)
  update = jax.jit(lambda state, x: tx.update(
      params, state, params,
      layer_stats={'Dense_0': bnp_optax.input_statistics(x)})[1])
  for x in xs:
    state = update(state, x)
  assert bool(tx.has_updated(state))
  running = state.inner.inner_opt_state.running_stats['Dense_0']
  return bnp_optax.LayerStats(running.mean, running.variance, *[None] * 3)


def _devices(xs):
  """The rows split over 8 devices, combined by ``all_reduce_statistics``."""
  mesh = jax.make_mesh((8,), ('batch',))
  rows = xs.reshape(-1, FEATURES)

  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=jax.P('batch'), out_specs=jax.P())
  def reduce(rows):
    stats = bnp_optax.all_reduce_statistics(
        bnp_optax.input_statistics(rows), 'batch')
    return stats.mean, stats.variance

  rows = jax.device_put(rows, jax.NamedSharding(mesh, jax.P('batch')))
  mean, variance = jax.jit(reduce)(rows)
  return bnp_optax.LayerStats(mean, variance, *[None] * 3)


ROUTES = {
    'tracing scan': _tracing_scan,
    'tracing shared kernel': _tracing_shared,
    'tracing nn.scan': _tracing_nn_scan,
    'linen shared module': _linen_shared,
    'nnx shared module': _nnx_shared,
    'multi_steps': _multi_steps,
    'devices': _devices,
}


@pytest.mark.parametrize('route', sorted(ROUTES))
def test_large_mean_is_merged_to_float32_accuracy(route):
  xs = _slices()
  stats = ROUTES[route](xs)
  rows = np.asarray(xs, np.float64).reshape(-1, FEATURES)
  want_mean, want_variance = rows.mean(0), rows.var(0)
  # One unit in the last place of a float32 near 1e6 is 2^-4.
  np.testing.assert_allclose(stats.mean, want_mean, rtol=0, atol=2.0 ** -4)
  np.testing.assert_allclose(stats.variance, want_variance, rtol=1e-5)
