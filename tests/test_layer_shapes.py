"""Every dense and conv shape, checked by equivalence with plain layers.

A DenseGeneral over several input axes is a Dense layer on the flattened
input; one with batch_dims is one Dense layer per batch index; a grouped
convolution is one convolution per group. BNP must precondition each exactly
as it preconditions the equivalent plain layers (float64, 1e-12).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnp_optax
from tests import models


def _bnp_update(model, params, x, steps=3, layer_specs=None):
  """Several BNP updates of ``model`` on ``x`` with a fixed squared loss."""
  tx = bnp_optax.scale_by_bnp(rho=0.7, layer_specs=layer_specs)
  state = tx.init(params)
  for i in range(steps):
    xi = x * (1 + 0.3 * i)

    def loss(p):
      y, stats = bnp_optax.linen.apply(model, {'params': p}, xi)
      return jnp.sum(jnp.sin(y)), stats

    grads, stats = jax.grad(loss, has_aux=True)(params)
    updates, state = jax.jit(tx.update)(grads, state, layer_stats=stats)
  return updates


def _f64(tree):
  return jax.tree.map(lambda p: p.astype(jnp.float64), tree)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                             atol=1e-14)


def test_dense_general_is_dense_on_the_flattened_input():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(models.badly_scaled_inputs(rng, (7, 3, 2)))
    general = nn.DenseGeneral((2, 2), axis=(-2, -1))
    params = _f64(general.init(jax.random.key(0), x)['params'])
    specs = bnp_optax.linen.layer_specs(general, {'params': params}, x)
    got = _bnp_update(general, params, x, layer_specs=specs)
    flat = {'kernel': params['kernel'].reshape(6, 4),
            'bias': params['bias'].reshape(4)}

    class Flat(nn.Module):  # the same loss, through a plain Dense layer
      @nn.compact
      def __call__(self, x):
        y = nn.Dense(4, name='inner')(x.reshape(x.shape[0], 6))
        return y.reshape(x.shape[0], 2, 2)

    want = _bnp_update(Flat(), {'inner': flat}, x)['inner']
  _close(got['kernel'].reshape(6, 4), want['kernel'])
  _close(got['bias'].reshape(4), want['bias'])


def test_dense_general_batch_dims_are_separate_layers():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    # (heads, N, in)
    x = jnp.asarray(models.badly_scaled_inputs(rng, (3, 5, 4)))
    general = nn.DenseGeneral(2, axis=-1, batch_dims=(0,))
    params = _f64(general.init(jax.random.key(0), x)['params'])
    assert params['kernel'].shape == (3, 4, 2)
    specs = bnp_optax.linen.layer_specs(general, {'params': params}, x)
    got = _bnp_update(general, params, x, layer_specs=specs)
    for head in range(3):
      slice_params = {'kernel': params['kernel'][head],
                      'bias': params['bias'][head]}
      want = _bnp_update(nn.Dense(2), slice_params, x[head])
      _close(got['kernel'][head], want['kernel'])
      _close(got['bias'][head], want['bias'])


@pytest.mark.parametrize('groups, c_in, c_out', [(2, 4, 6), (3, 3, 3)])
def test_grouped_conv_is_one_conv_per_group(groups, c_in, c_out):
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x = jnp.asarray(models.badly_scaled_inputs(rng, (2, 5, 5, c_in)))
    grouped = nn.Conv(c_out, (3, 3), feature_group_count=groups)
    params = _f64(grouped.init(jax.random.key(0), x)['params'])
    specs = bnp_optax.linen.layer_specs(grouped, {'params': params}, x)
    assert specs['<root>'].feature_groups == groups
    got = _bnp_update(grouped, params, x, layer_specs=specs)
    cin, cout = c_in // groups, c_out // groups
    for g in range(groups):
      part = {'kernel': params['kernel'][..., g * cout:(g + 1) * cout],
              'bias': params['bias'][g * cout:(g + 1) * cout]}
      want = _bnp_update(nn.Conv(cout, (3, 3)), part,
                         x[..., g * cin:(g + 1) * cin])
      _close(got['kernel'][..., g * cout:(g + 1) * cout], want['kernel'])
      _close(got['bias'][g * cout:(g + 1) * cout], want['bias'])


def test_grouped_conv_state_holds_all_input_channels():
  x = jnp.ones((2, 5, 5, 6))
  model = nn.Conv(6, (3, 3), feature_group_count=6)  # depthwise
  params = model.init(jax.random.key(0), x)['params']
  specs = bnp_optax.linen.layer_specs(model, {'params': params}, x)
  state = bnp_optax.scale_by_bnp(layer_specs=specs).init(params)
  assert state.running_stats['<root>'].mean.shape == (6,)
