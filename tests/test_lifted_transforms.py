"""Linen lifted transforms: work, or a clear error; never silent loss."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnp_optax
from tests import models

STATS = bnp_optax.linen.COLLECTION


_scanned = models.scanned


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.relu(nn.Dense(4, name=f'layer_{i}')(x))
    return x


def _updates(model, params, x, layer_specs=None, steps=2):
  tx = bnp_optax.scale_by_bnp(rho=0.5, layer_specs=layer_specs)
  state = tx.init(params)
  for i in range(steps):
    def loss(p):
      y, stats = bnp_optax.linen.apply(model, {'params': p}, x * (i + 1))
      return jnp.sum(jnp.cos(y)), stats
    grads, stats = jax.grad(loss, has_aux=True)(params)
    updates, state = jax.jit(tx.update)(grads, state, layer_stats=stats)
  return updates


def test_remat_works():
  model = nn.Sequential([nn.remat(nn.Dense)(3), nn.relu, nn.Dense(2)])
  x = jnp.arange(12.0).reshape(4, 3)
  variables = model.init(jax.random.key(0), x)
  _, stats = bnp_optax.linen.apply(model, variables, x)
  np.testing.assert_allclose(stats['layers_0'].mean, np.mean(x, 0))


def test_scan_without_the_collection_is_a_clear_error():
  model = _scanned({'params': 0})
  x = jnp.ones((5, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=re.escape(
      "layer 'blocks/Dense_0' runs inside a lifted transform")):
    bnp_optax.linen.apply(model, variables, x)


def test_scan_with_the_collection_equals_unrolled_layers():
  model = _scanned({'params': 0, STATS: 0})
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(models.badly_scaled_inputs(rng, (6, 4)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          model.init(jax.random.key(0), x)['params'])
    specs = bnp_optax.linen.layer_specs(model, {'params': params}, x)
    assert specs['blocks/Dense_0'].independent_axes == (0,)
    got = _updates(model, params, x, specs)['blocks']['Dense_0']
    stacked = params['blocks']['Dense_0']
    unrolled = {f'layer_{i}': {'kernel': stacked['kernel'][i],
                               'bias': stacked['bias'][i]} for i in range(3)}
    want = _updates(Unrolled(), unrolled, x)
    for i in range(3):
      for leaf in ('kernel', 'bias'):
        np.testing.assert_allclose(got[leaf][i], want[f'layer_{i}'][leaf],
                                   rtol=1e-12, atol=1e-14)


def test_vmap_ensemble_with_the_collection_is_one_layer_per_member():
  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):  # (members, N, features)
      dense = nn.vmap(nn.Dense, in_axes=0, out_axes=0,
                      variable_axes={'params': 0, STATS: 0},
                      split_rngs={'params': True})
      return dense(2)(x)

  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    x = jnp.asarray(models.badly_scaled_inputs(rng, (2, 5, 3)))
    model = Ensemble()
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          model.init(jax.random.key(0), x)['params'])
    specs = bnp_optax.linen.layer_specs(model, {'params': params}, x)
    got = _updates(model, params, x, specs)['VmapDense_0']
    for member in range(2):
      member_params = jax.tree.map(lambda p: p[member], params['VmapDense_0'])
      want = _updates(nn.Dense(2), member_params, x[member])
      for leaf in ('kernel', 'bias'):
        np.testing.assert_allclose(got[leaf][member], want[leaf], rtol=1e-12,
                                   atol=1e-14)


class _SharedStep(nn.Module):
  """One step of a weight-shared scan: the same Dense at every step."""

  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(carry.shape[-1], name='dense')(carry)), None


class _SharedScan(nn.Module):
  """Flax's weight-shared ``nn.scan``: params broadcast to every step."""
  length: int

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_SharedStep, variable_broadcast='params',
                   variable_axes={STATS: 0}, split_rngs={'params': False},
                   length=self.length)
    return scan(name='shared')(x, None)[0]


class _SharedUnrolled(nn.Module):
  """The same network, one Dense module called ``length`` times."""
  length: int

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(x.shape[-1], name='dense')
    for _ in range(self.length):
      x = jnp.tanh(dense(x))
    return x


@pytest.mark.parametrize('length', [4, 3])  # 4: scan length == width
def test_weight_shared_scan_merges_its_steps_like_a_shared_layer(length):
  rng = np.random.default_rng(2)
  model = _SharedScan(length)
  with jax.enable_x64(True):
    x = jnp.asarray(models.badly_scaled_inputs(rng, (6, 4)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          model.init(jax.random.key(0), x)['params'])
    specs = bnp_optax.linen.layer_specs(model, {'params': params}, x)
    # The shared kernel (4, 4) has no stacked axis.
    assert specs['shared/dense'] == bnp_optax.LayerSpec((), (0,))
    got = _updates(model, params, x, specs)['shared']['dense']
    want = _updates(_SharedUnrolled(length), params['shared'], x)['dense']
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-10,
                                 atol=1e-13)
    # The tracing route merges the steps the same way.
    fn = lambda p, x: model.apply({'params': p}, x)
    _, traced = bnp_optax.tracing.apply(fn, params, x)
    _, linen = bnp_optax.linen.apply(model, {'params': params}, x)
    merged = linen['shared/dense']
    np.testing.assert_allclose(merged.mean, traced['shared/dense/kernel'].mean,
                               rtol=1e-12)
    np.testing.assert_allclose(merged.variance,
                               traced['shared/dense/kernel'].variance,
                               rtol=1e-12)
    assert float(merged.batch_size) == 6 * length


def test_uncarried_collection_error_tells_stacked_from_shared_parameters():
  model = nn.scan(_SharedStep, variable_broadcast='params',
                  split_rngs={'params': False}, length=3)()
  x = jnp.ones((5, 4))
  variables = model.init(jax.random.key(0), x, None)
  with pytest.raises(ValueError, match="variable_broadcast='params'") as info:
    bnp_optax.linen.apply(model, variables, x, None)
  assert "stacked parameters (variable_axes={'params': 0" in str(info.value)


def test_weight_shared_scan_of_length_zero_leaves_the_layer_alone():
  x = jnp.ones((2, 4))
  params = _SharedScan(3).init(jax.random.key(0), x)['params']
  grads = jax.tree.map(jnp.ones_like, params)  # e.g. weight decay
  _, stats = bnp_optax.linen.apply(_SharedScan(0), {'params': params}, x)
  assert float(stats['shared/dense'].count) == 0
  tx = bnp_optax.scale_by_bnp()
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, layer_stats=stats)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  jax.tree.map(np.testing.assert_array_equal, new_state, state._replace(
      count=new_state.count))
