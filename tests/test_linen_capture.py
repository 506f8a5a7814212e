"""The linen intercept records the right inputs, at the right paths."""

import functools
import re

import chex
import flax.linen as nn
from flax.training import train_state
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(5)(x))


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Block(name='block')(x)
    h = nn.Dense(4, name='head')(h)
    return h, x, h  # outputs the head's input too, for checking


def test_paths_mirror_parameters_and_statistics_are_of_layer_inputs():
  model = Nested()
  x = jax.random.normal(jax.random.key(0), (7, 3)) * 4 + 2
  variables = model.init(jax.random.key(1), x)
  (out, _, _), stats = bnp_optax.linen.apply(model, variables, x)
  # Keyed by layer path, as the optimizer's running statistics.
  assert sorted(stats) == ['block/Dense_0', 'head']
  block_out = nn.relu(x @ variables['params']['block']['Dense_0']['kernel']
                      + variables['params']['block']['Dense_0']['bias'][None])
  for s, h in ((stats['block/Dense_0'], x), (stats['head'], block_out)):
    np.testing.assert_allclose(s.mean, np.mean(h, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.variance, np.var(h, 0), rtol=1e-4,
                               atol=1e-6)
    assert float(s.batch_size) == float(s.count) == 7
    assert float(s.positions) == 1
  np.testing.assert_allclose(out, model.apply(variables, x)[0])


@pytest.mark.parametrize('strides, padding, dilation, in_hw, out_hw', [
    (1, 'SAME', 1, (8, 6), (8, 6)),
    (2, 'SAME', 1, (8, 6), (4, 3)),
    (1, 'VALID', 1, (8, 6), (6, 4)),
    (2, ((1, 0), (2, 2)), 1, (8, 6), (4, 4)),
    (1, 'VALID', 2, (8, 6), (4, 2)),
])
def test_conv_positions_are_output_positions(strides, padding, dilation,
                                             in_hw, out_hw):
  model = nn.Conv(3, (3, 3), strides=strides, padding=padding,
                  kernel_dilation=dilation)
  x = jax.random.uniform(jax.random.key(0), (2, *in_hw, 2))
  variables = model.init(jax.random.key(1), x)
  y, layer_stats = bnp_optax.linen.apply(model, variables, x)
  stats = layer_stats['<root>']
  assert y.shape[1:3] == out_hw
  assert float(stats.positions) == out_hw[0] * out_hw[1]
  assert float(stats.batch_size) == 2
  assert float(stats.count) == 2 * in_hw[0] * in_hw[1]
  np.testing.assert_allclose(stats.mean, np.mean(x, (0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize('kernel_size, shape', [
    ((3,), (4, 10, 2)),         # 1-D
    ((3, 3, 3), (2, 5, 5, 5, 2)),  # 3-D
    ((3, 3), (6, 6, 2)),        # unbatched
])
def test_conv_of_any_rank(kernel_size, shape):
  model = nn.Conv(3, kernel_size)
  x = jax.random.uniform(jax.random.key(0), shape)
  params = model.init(jax.random.key(1), x)['params']

  def loss(params):
    y, stats = bnp_optax.linen.apply(model, {'params': params}, x)
    return jnp.sum(y ** 2), stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  batch = shape[0] if len(shape) == len(kernel_size) + 2 else 1
  assert float(stats['<root>'].batch_size) == batch
  assert float(stats['<root>'].positions) == np.prod(
      shape[-len(kernel_size) - 1:-1])
  tx = bnp_optax.scale_by_bnp()
  updates, _ = tx.update(grads, tx.init(params), layer_stats=stats)
  assert bnp_optax.describe_coverage(params)['kernel'] == 'conv kernel'
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_shared_layer_statistics_are_merged_exactly():
  class Siamese(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      dense = nn.Dense(2)
      return jnp.concatenate([dense(a), dense(b)])

  model = Siamese()
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 4))
  b = rng.standard_normal((5, 4)) * 3 + 1
  with jax.enable_x64(True):
    a, b = jnp.asarray(a), jnp.asarray(b)
    variables = model.init(jax.random.key(0), a, a)
    _, stats = bnp_optax.linen.apply(model, variables, a, b)
    both = np.concatenate([a, b])
    np.testing.assert_allclose(stats['Dense_0'].mean, both.mean(0),
                               rtol=1e-12)
    np.testing.assert_allclose(stats['Dense_0'].variance, both.var(0),
                               rtol=1e-12)
  assert float(stats['Dense_0'].batch_size) == 8


def test_mutable_collections_are_passed_through():
  class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))
      return nn.Dense(2)(x)

  model = WithBatchNorm()
  x = jnp.ones((4, 3)) * jnp.arange(3.0)[None]
  variables = model.init(jax.random.key(0), x)
  (y, mutated), stats = bnp_optax.linen.apply(
      model, variables, x, mutable=['batch_stats'])
  want_y, want_mutated = model.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, want_y)
  assert set(mutated) == {'batch_stats'}
  jax.tree.map(np.testing.assert_allclose, mutated, want_mutated)
  assert sorted(stats) == ['Dense_0', 'Dense_1']


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def test_no_extra_forward_pass():
  """The loss with statistics has as many matmuls as the plain one.

  Matrix-matrix products only: on CPU the statistics' column sums are
  vector-matrix products with a vector of ones (``statistics._column_sums``).
  """
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu,
                         nn.Dense(2)])
  x = jnp.ones((16, 4))
  params = model.init(jax.random.key(0), x)['params']

  def count_dots(fn):
    jaxpr = jax.make_jaxpr(jax.grad(fn, has_aux=True))(params).jaxpr
    return sum(
        eqn.primitive.name == 'dot_general'
        and all(v.aval.ndim >= 2 for v in eqn.invars)
        for eqn in _equations(jaxpr))

  plain = lambda p: (jnp.sum(model.apply({'params': p}, x)), None)
  with_stats = lambda p: (lambda y, s: (jnp.sum(y), s))(
      *bnp_optax.linen.apply(model, {'params': p}, x))
  assert count_dots(with_stats) == count_dots(plain)


def test_inputs_given_by_keyword_and_model_that_is_one_layer():
  model = nn.Dense(3)
  x = jnp.arange(8.0).reshape(4, 2)
  params = model.init(jax.random.key(0), x)['params']

  def loss(params):
    y, stats = bnp_optax.linen.apply(model, {'params': params}, inputs=x)
    return jnp.sum(y), stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  assert list(stats) == ['<root>']
  tx = bnp_optax.bnp(0.1)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, layer_stats=stats)
  np.testing.assert_allclose(state[0].running_stats['<root>'].mean,
                             0.01 * np.mean(x, 0), rtol=1e-6)


def test_model_apply_alone_records_nothing():
  model = nn.Dense(3)
  x = jnp.ones((2, 2))
  variables = model.init(jax.random.key(0), x)
  _, mutated = model.apply(variables, x, mutable=True)
  assert set(mutated) == {'params'}


def test_bound_apply_of_a_flax_train_state_is_accepted():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = jax.random.normal(jax.random.key(0), (4, 3))
  variables = model.init(jax.random.key(1), x)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      tx=bnp_optax.bnp(0.1))
  y, stats = bnp_optax.linen.apply(state.apply_fn, {'params': state.params}, x)
  y_ref, stats_ref = bnp_optax.linen.apply(model, variables, x)
  np.testing.assert_array_equal(y, y_ref)
  chex.assert_trees_all_equal(stats, stats_ref)

  def loss_fn(params):
    out, layer_stats = bnp_optax.linen.apply(
        state.apply_fn, {'params': params}, x)
    return jnp.sum(out ** 2), layer_stats

  grads, layer_stats = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(
      grads, state.opt_state, state.params, layer_stats=layer_stats)
  state = state.replace(params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
  assert bnp_optax.linen.layer_specs(state.apply_fn, variables, x) == (
      bnp_optax.linen.layer_specs(model, variables, x))
  # Keyword arguments bound with functools.partial are passed on.
  (y_mut, mutated), _ = bnp_optax.linen.apply(
      functools.partial(model.apply, mutable=True), variables, x)
  np.testing.assert_array_equal(y_mut, y_ref)
  assert set(mutated) == {'params'}


def test_a_callable_that_is_not_a_module_apply_is_refused():
  model = nn.Dense(2)
  x = jnp.ones((2, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=re.escape(
      'the first argument must be the linen module (or its bound method '
      'module.apply)')):
    bnp_optax.linen.apply(lambda v, x: model.apply(v, x), variables, x)


@pytest.mark.parametrize('keyword', ['spec_fn', 'layout_fn'])
def test_register_layer_takes_a_spec_fn_as_nnx_does(keyword):
  class Grouped(nn.Module):  # kernel (c_in / groups, c_out), two groups
    @nn.compact
    def __call__(self, x):
      self.param('kernel', nn.initializers.ones, (2, 6))
      return x

  spec = bnp_optax.LayerSpec(spatial_axes=(), fan_in_axes=(0,),
                             feature_groups=2)
  measure = lambda module, args, kwargs, outputs: (
      bnp_optax.input_statistics(args[0]))
  bnp_optax.linen.register_layer(Grouped, measure,
                                 **{keyword: lambda module: spec})
  x = jnp.ones((3, 4))
  variables = Grouped().init(jax.random.key(0), x)
  _, layer_stats = bnp_optax.linen.apply(Grouped(), variables, x)
  assert layer_stats['<root>'].spec == spec
  assert bnp_optax.linen.layer_specs(Grouped(), variables, x) == {
      '<root>': spec}
  # Statistics that record another spec disagree with spec_fn: an error.
  bnp_optax.linen.register_layer(
      Grouped, lambda module, args, kwargs, outputs: (
          bnp_optax.input_statistics(args[0], spec=bnp_optax.LayerSpec(
              spatial_axes=(), fan_in_axes=(0,)))),
      spec_fn=lambda module: spec)
  with pytest.raises(ValueError, match=re.escape(
      "layer '<root>': its statistics record the spec")):
    bnp_optax.linen.apply(Grouped(), variables, x)


class DotReluDot(nn.Module):
  """The block of Flax's pjit guide: a Dense, then a raw ``self.param``."""
  depth: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.depth, use_bias=False,
                 kernel_init=nn.with_partitioning(
                     nn.initializers.xavier_normal(), (None, 'model')))(x)
    y = jax.nn.relu(y)
    w2 = self.param('W2', nn.with_partitioning(
        nn.initializers.xavier_normal(), ('model', None)),
        (self.depth, x.shape[-1]))
    return jnp.dot(y, w2), None


class PjitMLP(nn.Module):
  num_layers: int = 2
  depth: int = 6

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_layers):
      x, _ = DotReluDot(self.depth)(x)
    return x


def test_coverage_names_raw_parameters_with_reason_and_route():
  model = PjitMLP()
  x = jnp.arange(12.0).reshape(3, 4)
  params = nn.meta.unbox(model.init(jax.random.key(0), x)['params'])
  _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
  coverage = bnp_optax.describe_coverage(params, stats)
  for i in range(2):
    assert coverage[f'DotReluDot_{i}/Dense_0/kernel'] == 'dense kernel'
    reason = coverage[f'DotReluDot_{i}/W2']
    assert reason.startswith(
        'pass-through: a parameter of DotReluDot, which is not a registered '
        'layer type')
    assert 'bnp_optax.tracing.apply(model.apply, variables, x)' in reason
    assert 'bnp_optax.linen.register_layer' in reason
  # The route named there does see it.
  fn = lambda p, x: model.apply({'params': p}, x)
  assert bnp_optax.tracing.describe(fn, params, x)['DotReluDot_0/W2'] == (
      'dense kernel')
  # And the optimizer passes it through, preconditioning the rest.
  tx = bnp_optax.scale_by_bnp()
  updates, _ = tx.update(params, tx.init(params), layer_stats=stats)
  np.testing.assert_array_equal(updates['DotReluDot_0']['W2'],
                                params['DotReluDot_0']['W2'])
