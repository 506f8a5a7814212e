"""Many devices: statistics of the global batch, exactly.

Runs on 8 fake CPU devices (the root conftest sets
``--xla_force_host_platform_device_count=8``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import bnp_optax

NUM_DEVICES = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8',
)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(4)(x)


def _data(per_device=2):
  rng = np.random.default_rng(0)
  n = NUM_DEVICES * per_device
  x = rng.standard_normal((n, 5, 5, 2)).astype(np.float32)
  # Each device's share has its own offset: the mean of per-device
  # variances would be far from the global variance.
  x += np.repeat(np.arange(NUM_DEVICES) * 3.0, per_device)[:, None, None,
                                                            None]
  y = rng.integers(0, 4, size=n)
  return jnp.asarray(x), jnp.asarray(y)


def _loss(model, params, x, y, axis_name=None):
  out, stats = bnp_optax.linen.apply(model, {'params': params}, x,
                                     axis_name=axis_name)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      out, y)), stats


def _reference_step(model, tx, params, state, x, y):
  grads, stats = jax.grad(functools.partial(_loss, model), has_aux=True)(
      params, x, y)
  updates, state = tx.update(grads, state, params, layer_stats=stats)
  return optax.apply_updates(params, updates), state, stats


def _assert_trees_close(a, b, rtol=2e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-6), a, b)


@pytest.mark.parametrize('per_device', [1, 2])
def test_shard_map_combines_devices_exactly(per_device):
  model, tx = CNN(), bnp_optax.bnp(0.1, momentum=0.9)
  x, y = _data(per_device)
  params = model.init(jax.random.key(0), x[:1])['params']
  state = tx.init(params)
  want_params, want_state, want_stats = jax.jit(
      functools.partial(_reference_step, model, tx))(params, state, x, y)

  mesh = jax.make_mesh((NUM_DEVICES,), ('batch',))

  def device_step(params, state, x, y):
    def global_loss(params):
      # The global mean loss; its gradient with respect to the replicated
      # parameters is the same on every device.
      loss, stats = _loss(model, params, x, y, axis_name='batch')
      return jax.lax.pmean(loss, 'batch'), stats
    grads, stats = jax.grad(global_loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, stats

  step = jax.jit(jax.shard_map(
      device_step, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
      out_specs=(P(), P(), P())))
  on = lambda spec, t: jax.device_put(t, NamedSharding(mesh, spec))
  got_params, got_state, got_stats = step(
      on(P(), params), on(P(), state), on(P('batch'), x), on(P('batch'), y))
  _assert_trees_close(got_stats, want_stats)
  assert float(got_stats['Dense_0'].batch_size) == NUM_DEVICES * per_device
  _assert_trees_close(got_state, want_state)
  _assert_trees_close(got_params, want_params)
  # The naive mean of per-device variances is not what we computed.
  local = [bnp_optax.input_statistics(x[i::NUM_DEVICES]).variance
           for i in range(NUM_DEVICES)]
  assert not np.allclose(np.mean(local, 0), got_stats['Conv_0'].variance,
                         rtol=1e-2)


def test_jit_with_sharded_batch_uses_the_global_batch():
  model, tx = CNN(), bnp_optax.bnp(0.1)
  x, y = _data()
  params = model.init(jax.random.key(0), x[:1])['params']
  state = tx.init(params)
  step = jax.jit(functools.partial(_reference_step, model, tx))
  want = step(params, state, x, y)
  mesh = jax.make_mesh((NUM_DEVICES,), ('batch',))
  sharded = NamedSharding(mesh, P('batch'))
  replicated = NamedSharding(mesh, P())
  xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)
  assert len(xs.sharding.device_set) == NUM_DEVICES
  got = step(jax.device_put(params, replicated),
             jax.device_put(state, replicated), xs, ys)
  _assert_trees_close(got, want)


def test_pmap_with_axis_name():
  model, tx = CNN(), bnp_optax.bnp(0.1)
  x, y = _data()
  params = model.init(jax.random.key(0), x[:1])['params']
  state = tx.init(params)
  want_params, want_state, _ = jax.jit(
      functools.partial(_reference_step, model, tx))(params, state, x, y)

  def device_step(params, state, x, y):
    grads, stats = jax.grad(
        functools.partial(_loss, model, axis_name='batch'), has_aux=True)(
            params, x, y)
    grads = jax.lax.pmean(grads, 'batch')
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  replicate = lambda t: jax.tree.map(
      lambda a: jnp.broadcast_to(a, (NUM_DEVICES, *a.shape)), t)
  shard = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])
  got_params, got_state = jax.pmap(device_step, axis_name='batch')(
      replicate(params), replicate(state), shard(x), shard(y))
  _assert_trees_close(jax.tree.map(lambda a: a[0], got_params), want_params)
  _assert_trees_close(jax.tree.map(lambda a: a[0], got_state), want_state)


@pytest.mark.parametrize('mapping', ['shard_map', 'pmap'])
def test_tracing_apply_with_axis_name_combines_devices_exactly(mapping):
  model = CNN()
  x, y = _data()
  params = model.init(jax.random.key(0), x[:1])['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  tx = bnp_optax.bnp(0.1, layer_specs=bnp_optax.tracing.layer_specs(
      fn, params, x))
  state = tx.init(params)

  def loss(params, x, y, axis_name=None):
    out, stats = bnp_optax.tracing.apply(fn, params, x, axis_name=axis_name)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        out, y)), stats

  def reference(params, state, x, y):
    grads, stats = jax.grad(loss, has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, stats

  want = jax.jit(reference)(params, state, x, y)

  def device_step(params, state, x, y):
    if mapping == 'shard_map':
      # The global mean loss: shard_map's gradient of the replicated
      # parameters is then the global gradient on every device.
      def global_loss(params):
        value, stats = loss(params, x, y, axis_name='batch')
        return jax.lax.pmean(value, 'batch'), stats
      grads, stats = jax.grad(global_loss, has_aux=True)(params)
    else:
      grads, stats = jax.grad(functools.partial(loss, axis_name='batch'),
                              has_aux=True)(params, x, y)
      grads = jax.lax.pmean(grads, 'batch')
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, stats

  if mapping == 'shard_map':
    mesh = jax.make_mesh((NUM_DEVICES,), ('batch',))
    step = jax.jit(jax.shard_map(
        device_step, mesh=mesh, in_specs=(P(), P(), P('batch'), P('batch')),
        out_specs=(P(), P(), P())))
    on = lambda spec, t: jax.device_put(t, NamedSharding(mesh, spec))
    got = step(on(P(), params), on(P(), state), on(P('batch'), x),
              on(P('batch'), y))
  else:
    replicate = lambda t: jax.tree.map(
        lambda a: jnp.broadcast_to(a, (NUM_DEVICES, *a.shape)), t)
    shard = lambda a: a.reshape(NUM_DEVICES, -1, *a.shape[1:])
    got = jax.pmap(device_step, axis_name='batch')(
        replicate(params), replicate(state), shard(x), shard(y))
    got = jax.tree.map(lambda a: a[0], got)
  assert float(got[2]['Dense_0/kernel'].batch_size) == len(x)
  _assert_trees_close(got, want)
