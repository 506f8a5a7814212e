"""Bad input stops with a message that names the layer or argument at fault."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models


@pytest.fixture(name='setup')
def _setup():
  model = models.MLP()
  x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0), (4, 6)),
                  jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
  tx = bnp_optax.scale_by_bnp()
  return params, stats, tx, tx.init(params)


def test_missing_layer_stats(setup):
  params, _, tx, state = setup
  with pytest.raises(ValueError,
                     match='needs the keyword argument layer_stats'):
    tx.update(params, state, params)
  chained = bnp_optax.bnp(0.1)
  with pytest.raises(ValueError,
                     match='needs the keyword argument layer_stats'):
    chained.update(params, chained.init(params), params)


def test_layer_without_statistics(setup):
  params, stats, tx, state = setup
  partial = {k: v for k, v in stats.items() if k != 'Dense_1'}
  with pytest.raises(ValueError, match=re.escape(
      "no statistics in layer_stats for the layers ['Dense_1']")):
    tx.update(params, state, layer_stats=partial)


def test_statistics_without_layer(setup):
  params, stats, tx, state = setup
  extra = dict(stats, Extra_0=stats['Dense_0'])
  with pytest.raises(ValueError, match=re.escape(
      "layer_stats has statistics for ['Extra_0']")):
    tx.update(params, state, layer_stats=extra)


def test_statistics_of_the_wrong_shape(setup):
  params, stats, tx, state = setup
  wrong = dict(stats, Dense_2=stats['Dense_1'])  # 5 features, not 4
  with pytest.raises(ValueError, match=re.escape(
      "layer 'Dense_2': statistics mean has shape (5,) but its dense kernel "
      'of shape (4, 3) has fan-in shape (4,)')):
    jax.jit(tx.update)(params, state, layer_stats=wrong)


def test_not_layer_stats(setup):
  params, stats, tx, state = setup
  wrong = dict(stats, Dense_0={'mean': stats['Dense_0'].mean})
  with pytest.raises(TypeError, match=re.escape(
      "layer_stats['Dense_0/mean'] is a ArrayImpl, not a "
      'bnp_optax.LayerStats')):
    tx.update(params, state, layer_stats=wrong)


def test_bias_that_does_not_match_kernel(setup):
  params, stats, tx, state = setup
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['Dense_0']['bias'] = jnp.zeros(7)
  with pytest.raises(ValueError, match=re.escape(
      "layer 'Dense_0': bias shape (7,) does not match the output axes (5,)")):
    tx.update(grads, state, layer_stats=stats)


def test_state_from_another_model(setup):
  params, stats, tx, _ = setup
  other = {'Dense_0': params['Dense_0']}
  state = tx.init(other)
  with pytest.raises(ValueError, match=re.escape(
      "holds running statistics for ['Dense_0'] but the gradients have layers "
      "['Dense_0', 'Dense_1', 'Dense_2']")):
    tx.update(params, state, layer_stats=stats)


@pytest.mark.parametrize('kwargs, message', [
    ({'rho': 1.0}, 'rho must be in [0, 1), got 1.0'),
    ({'rho': -0.1}, 'rho must be in [0, 1), got -0.1'),
    ({'eps1': -1e-3}, 'eps1 must be >= 0, got -0.001'),
    ({'eps2': -1.0}, 'eps2 must be >= 0, got -1.0'),
])
def test_invalid_hyperparameters(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    bnp_optax.scale_by_bnp(**kwargs)
  with pytest.raises(ValueError, match=re.escape(message)):
    bnp_optax.bnp(0.1, **kwargs)


def test_invalid_hyperparameters_under_inject_hyperparams():
  with pytest.raises(ValueError, match=re.escape('rho must be in [0, 1)')):
    optax.inject_hyperparams(bnp_optax.scale_by_bnp)(rho=1.5).init({})


def test_layer_specs_naming_unknown_layer(setup):
  params, _, _, _ = setup
  tx = bnp_optax.scale_by_bnp(
      layer_specs={'Nope': bnp_optax.LayerSpec((), (0,))})
  with pytest.raises(ValueError, match=re.escape(
      "layer_specs names layers with no kernel in the parameters: ['Nope']")):
    tx.init(params)


@pytest.mark.parametrize('layer, name', [
    ('ConvTranspose', 'a transposed convolution sees a zero-dilated input'),
    ('ConvLocal', 'its kernel differs at every position'),
])
def test_unsupported_convolutions_pass_through_with_their_reason(layer,
                                                                  name):
  import flax.linen as nn
  model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu,
                         getattr(nn, layer)(4, (3, 3))])
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4)) + 2
  params = model.init(jax.random.key(0), x)['params']
  tx = bnp_optax.bnp(0.1)

  def loss(p):
    y, stats = bnp_optax.linen.apply(model, {'params': p}, x)
    return jnp.mean(y ** 2), stats

  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert stats['layers_2'] == bnp_optax.NotPreconditioned(
      stats['layers_2'].reason)
  coverage = bnp_optax.describe_coverage(params, stats)
  assert coverage['layers_2/kernel'].startswith(
      f'pass-through: a {layer}, which BNP does not precondition ({name})')
  assert coverage['layers_0/kernel'] == 'conv kernel'
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                                  layer_stats=stats)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g,
                                                       rtol=1e-6),
               updates['layers_2'], grads['layers_2'])
  assert not np.allclose(updates['layers_0']['kernel'],
                         -0.1 * grads['layers_0']['kernel'])


def test_linen_decoder_with_transposed_conv_matches_the_tracing_route():
  import flax.linen as nn

  class Decoder(nn.Module):  # a U-Net/GAN-style upsampling block
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(3, (3, 3))(x))
      x = nn.relu(nn.ConvTranspose(3, (2, 2), strides=(2, 2))(x))
      return nn.Conv(2, (3, 3))(x)

  model = Decoder()
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2), jnp.float64) * 3
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          model.init(jax.random.key(0), x)['params'])
    loss = lambda y: jnp.sum(jnp.sin(y))

    def linen_step(p):
      def f(p):
        y, stats = bnp_optax.linen.apply(model, {'params': p}, x)
        return loss(y), stats
      grads, stats = jax.grad(f, has_aux=True)(p)
      tx = bnp_optax.scale_by_bnp()
      return tx.update(grads, tx.init(p), layer_stats=stats)[0]

    def tracing_step(p):
      fn = lambda p, x: model.apply({'params': p}, x)
      specs = bnp_optax.tracing.layer_specs(fn, p, x)
      assert 'ConvTranspose_0/kernel' not in specs  # stride 2: passed
      def f(p):
        y, stats = bnp_optax.tracing.apply(fn, p, x)
        return loss(y), stats
      grads, stats = jax.grad(f, has_aux=True)(p)
      tx = bnp_optax.scale_by_bnp(layer_specs=specs)
      return tx.update(grads, tx.init(p), layer_stats=stats)[0]

    got, want = jax.jit(linen_step)(params), jax.jit(tracing_step)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                         atol=1e-14),
                 got, want)


def test_dense_general_without_layer_specs_says_what_to_do():
  import flax.linen as nn
  model = nn.DenseGeneral(4, axis=(-2, -1))
  x = jnp.ones((3, 5, 2))
  params = model.init(jax.random.key(0), x)['params']
  _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
  tx = bnp_optax.scale_by_bnp()
  with pytest.raises(ValueError, match=re.escape(
      "layer '<root>': the optimizer state holds statistics of shape (2,), "
      'but the layer, a dense kernel (5, 2, 4)')) as info:
    tx.update(params, tx.init(params), layer_stats=stats)
  assert 'bnp_optax.linen.layer_specs(model, variables, x)' in str(info.value)


@pytest.mark.parametrize('params', [
    {'a/w': jnp.ones((3, 2)), 'a': {'w': jnp.ones((3, 2))}},
    {'a/b': {'kernel': jnp.ones((3, 2))}, 'a': {'b': {'kernel': jnp.ones(
        (3, 2))}}},
])
def test_colliding_path_names_are_an_error_naming_both(params):
  specs = None
  if 'a/w' in params:  # plain JAX: layers given by kernel leaf path
    specs = {'a/w': bnp_optax.LeafLayer(bnp_optax.LayerSpec((), (0,)))}
  tx = bnp_optax.scale_by_bnp(layer_specs=specs)
  for call in (lambda: tx.init(params),
               lambda: bnp_optax.describe_coverage(params, layer_specs=specs)):
    with pytest.raises(ValueError, match=re.escape(
        "are both named 'a/")) as info:
      call()
    assert "['a/" in str(info.value) and "['a']" in str(info.value)


def test_colliding_statistics_names_are_an_error():
  stats = bnp_optax.input_statistics(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=re.escape("are both named 'a/b'")):
    bnp_optax.describe_coverage(
        {'a': {'b': {'kernel': jnp.ones((3, 2))}}},
        {'a/b': stats, 'a': {'b': stats}})


def test_stride_one_conv_transpose_routes_as_the_readme_says():
  import flax.linen as nn
  model = nn.Sequential([nn.ConvTranspose(3, (3, 3)), nn.relu,
                         nn.ConvTranspose(2, (2, 2), strides=(2, 2))])
  x = jnp.ones((2, 4, 4, 2))
  params = model.init(jax.random.key(0), x)['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  roles = bnp_optax.tracing.describe(fn, params, x)
  assert roles['layers_0/kernel'] == 'conv kernel'  # an ordinary conv
  assert roles['layers_2/kernel'].startswith('pass-through')
  _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
  coverage = bnp_optax.describe_coverage(params, stats)
  for layer in ('layers_0', 'layers_2'):  # refused by type
    assert coverage[f'{layer}/kernel'].startswith(
        'pass-through: a ConvTranspose')
