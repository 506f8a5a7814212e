"""BNP behaves as an optax transformation should (cf. optax's common tests).

As optax's common test runs every optimizer through every wrapper, the
properties are checked through every capture route: the same MLP as a linen
module (``bnp_optax.linen.apply``), as an NNX module with the same parameters
(``bnp_optax.nnx.apply``) and as a plain function of the linen parameters
(``bnp_optax.tracing.apply``, with its ``layer_specs``).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax._src import layers as layers_lib
from tests import models

ROUTES = ('linen', 'nnx', 'tracing')
# The MLP's layers and their fan-in.
FAN_IN = {'Dense_0': 6, 'Dense_1': 5, 'Dense_2': 4}


class _NNXMLP(nnx.Module):
  """``models.MLP`` in NNX, its layers named as linen names them."""

  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(6, 5, rngs=rngs)
    self.Dense_1 = nnx.Linear(5, 4, use_bias=False, rngs=rngs)
    self.Dense_2 = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.Dense_0(x))
    x = nnx.relu(self.Dense_1(x))
    return self.Dense_2(x)


class _Case(NamedTuple):
  """One capture route of the MLP.

  Attributes:
    x: the inputs.
    params: the parameters (a dict, or an NNX ``State``).
    grads_and_stats: ``(params, x) -> (grads, layer_stats)``.
    layer_specs: what the optimizer needs to be given, or ``None``.
    layer: the key of a layer (``'Dense_0'``) in ``layer_stats`` and the
      running statistics.
  """

  x: jax.Array
  params: Any
  grads_and_stats: Callable[[Any, jax.Array], tuple[Any, Any]]
  layer_specs: Any
  layer: Callable[[str], str]


def _setup(route='linen', batch_size=4, dtype=jnp.float32) -> _Case:
  model = models.MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(models.badly_scaled_inputs(rng, (batch_size, 6)), dtype)
  y = jnp.asarray(rng.integers(0, 3, size=batch_size))
  params = model.init(jax.random.key(0), x)['params']
  cross_entropy = lambda out: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
          out.astype(jnp.float32), y))
  fn = lambda p, x: model.apply({'params': p}, x)
  if route == 'linen':
    capture = lambda p, x: bnp_optax.linen.apply(model, {'params': p}, x)
  elif route == 'nnx':
    graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    params = state
    capture = lambda p, x: bnp_optax.nnx.apply(nnx.merge(graphdef, p), x)
  else:
    capture = lambda p, x: bnp_optax.tracing.apply(fn, p, x)

  def grads_and_stats(params, x):
    def loss(params):
      out, stats = capture(params, x)
      return cross_entropy(out), stats
    return jax.grad(loss, has_aux=True)(params)

  if route == 'tracing':
    return _Case(x, params, grads_and_stats,
                 bnp_optax.tracing.layer_specs(fn, params, x),
                 lambda name: f'{name}/kernel')
  return _Case(x, params, grads_and_stats, None, lambda name: name)


def _pure(tree):
  """A parameter-shaped tree as nested dicts, whatever the route."""
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return tree


@pytest.mark.parametrize('route', ROUTES)
def test_every_route_returns_the_same_layer_stats_and_updates(route):
  case, linen = _setup(route), _setup('linen')
  grads, stats = case.grads_and_stats(case.params, case.x)
  want_grads, want_stats = linen.grads_and_stats(linen.params, linen.x)
  # One shape for every route: {layer key: LayerStats}.
  assert isinstance(stats, dict)
  assert set(stats) == {case.layer(name) for name in FAN_IN}
  for name in FAN_IN:
    got, want = stats[case.layer(name)], want_stats[name]
    assert isinstance(got, bnp_optax.LayerStats)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6)
    np.testing.assert_allclose(got.variance, want.variance, rtol=1e-5)
  tx = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs)
  updates, _ = tx.update(grads, tx.init(case.params), case.params,
                         layer_stats=stats)
  linen_tx = bnp_optax.scale_by_bnp()
  want, _ = linen_tx.update(want_grads, linen_tx.init(linen.params),
                            layer_stats=want_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               _pure(updates), want)


@pytest.mark.parametrize('route', ROUTES)
def test_accepts_and_ignores_unknown_extra_args(route):
  case = _setup(route)
  grads, stats = case.grads_and_stats(case.params, case.x)
  tx = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs)
  state = tx.init(case.params)
  plain = tx.update(grads, state, case.params, layer_stats=stats)
  extra = tx.update(grads, state, case.params, layer_stats=stats, loss=3.0,
                    value=jnp.ones(2))
  jax.tree.map(np.testing.assert_array_equal, plain, extra)


@pytest.mark.parametrize('route', ROUTES)
def test_no_recompilation_on_second_step_and_stable_state_dtypes(route):
  case = _setup(route)
  tx = bnp_optax.bnp(learning_rate=0.1, momentum=0.9,
                     layer_specs=case.layer_specs)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(None)
    grads, stats = case.grads_and_stats(params, x)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  params = case.params
  state = tx.init(params)
  init_types = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for i in range(3):
    params, state = step(params, state, case.x + i)
  assert len(traces) == 1
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == init_types


@pytest.mark.parametrize('route', ROUTES)
def test_init_sets_paper_initial_statistics_and_never_updates_them(route):
  case = _setup(route)
  state = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs).init(
      case.params)
  assert set(state.running_stats) == {case.layer(name) for name in FAN_IN}
  for name, n_in in FAN_IN.items():
    running = state.running_stats[case.layer(name)]
    np.testing.assert_array_equal(running.mean, np.zeros(n_in))
    np.testing.assert_array_equal(running.variance, np.ones(n_in))
    assert running.mean.dtype == jnp.float32
  assert int(state.count) == 0


@pytest.mark.parametrize('route', ROUTES)
def test_chain_with_momentum_is_momentum_on_preconditioned_gradients(route):
  case = _setup(route)
  x, params, grads_and_stats = case.x, case.params, case.grads_and_stats
  lr, beta = 0.1, 0.9
  tx = bnp_optax.bnp(learning_rate=lr, momentum=beta,
                     layer_specs=case.layer_specs)
  precond = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs)
  state, p_state = tx.init(params), precond.init(params)
  trace = jax.tree.map(jnp.zeros_like, params)
  for i in range(3):
    grads, stats = grads_and_stats(params, x * (1 + 0.1 * i))
    updates, state = jax.jit(tx.update)(grads, state, params,
                                        layer_stats=stats)
    pgrads, p_state = jax.jit(precond.update)(grads, p_state, params,
                                              layer_stats=stats)
    trace = jax.tree.map(lambda t, g: beta * t + g, trace, pgrads)
    jax.tree.map(
        lambda u, t: np.testing.assert_allclose(u, -lr * t, rtol=1e-6,
                                                atol=1e-7),
        updates, trace)
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize('route', ROUTES)
def test_works_under_inject_hyperparams_without_retracing(route):
  case = _setup(route)
  params = case.params
  grads, stats = case.grads_and_stats(params, case.x)
  specs = case.layer_specs
  injected = optax.inject_hyperparams(
      bnp_optax.scale_by_bnp, static_args=('layer_specs',))(
          rho=0.5, eps1=0.1, eps2=1e-3, layer_specs=specs)
  plain = bnp_optax.scale_by_bnp(rho=0.5, eps1=0.1, eps2=1e-3,
                                 layer_specs=specs)
  traces = []

  @jax.jit
  def update(state):
    traces.append(None)
    return injected.update(grads, state, params, layer_stats=stats)

  state = injected.init(params)
  got, new_state = update(state)
  want, _ = plain.update(grads, plain.init(params), params,
                         layer_stats=stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)
  # Changing a hyperparameter in the state changes the result, same trace.
  old = state.hyperparams['rho']
  state.hyperparams['rho'] = old * 0 + 0.9  # same dtype and weak type
  changed, _ = update(state)
  want_09, _ = bnp_optax.scale_by_bnp(
      rho=0.9, eps1=0.1, eps2=1e-3, layer_specs=specs).update(
          grads, plain.init(params), params, layer_stats=stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               changed, want_09)
  assert len(traces) == 1
  del new_state


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_updates_in_gradient_dtype_statistics_in_float32(route, dtype):
  case = _setup(route, dtype=dtype)
  params = jax.tree.map(lambda p: p.astype(dtype), case.params)
  grads, stats = case.grads_and_stats(params, case.x)
  for s in jax.tree.leaves(stats):
    assert s.dtype == jnp.float32
  tx = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params,
                                          layer_stats=stats)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.dtype == g.dtype == dtype
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.dtype == b.dtype
  for running in new_state.running_stats.values():
    assert running.mean.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(running.variance)))


@pytest.mark.parametrize('route', ROUTES)
def test_non_finite_statistics_leave_running_statistics_unchanged(route):
  case = _setup(route)
  params = case.params
  grads, stats = case.grads_and_stats(params, case.x)
  tx = bnp_optax.scale_by_bnp(layer_specs=case.layer_specs)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, layer_stats=stats)
  dense_0, dense_1 = case.layer('Dense_0'), case.layer('Dense_1')
  bad = dict(stats)
  bad[dense_1] = stats[dense_1].replace(
      mean=stats[dense_1].mean.at[0].set(jnp.nan),
      variance=stats[dense_1].variance.at[2].set(jnp.inf))
  updates, new_state = jax.jit(tx.update)(grads, state, params,
                                          layer_stats=bad)
  old_layer = state.running_stats[dense_1]
  new_layer = new_state.running_stats[dense_1]
  for field in ('mean', 'variance'):
    old, new = getattr(old_layer, field), getattr(new_layer, field)
    # The features with a non-finite statistic keep their running values...
    np.testing.assert_array_equal(new[np.array([0, 2])], old[np.array([0, 2])])
    # ... the others, and the other layers, are updated as usual.
    assert not np.any(new[np.array([1, 3, 4])] == old[np.array([1, 3, 4])])
    assert not np.array_equal(
        getattr(new_state.running_stats[dense_0], field),
        getattr(state.running_stats[dense_0], field))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_parameters_without_statistics_pass_through():
  """LayerNorm scales and embeddings are not preconditioned."""
  import flax.linen as nn

  class WithNorms(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(10, 4)(tokens)
      h = nn.LayerNorm()(h)
      return nn.Dense(3)(h)

  model = WithNorms()
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = model.init(jax.random.key(0), tokens)['params']

  def loss(params):
    out, stats = bnp_optax.linen.apply(model, {'params': params}, tokens)
    return jnp.sum(out ** 2), stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  assert stats['Dense_0'].batch_size == 6  # (2, 3) rows of the Dense input
  tx = bnp_optax.scale_by_bnp()
  updates, _ = tx.update(grads, tx.init(params), layer_stats=stats)
  for name in ('Embed_0', 'LayerNorm_0'):
    jax.tree.map(np.testing.assert_array_equal, updates[name], grads[name])
  assert not np.allclose(updates['Dense_0']['kernel'],
                         grads['Dense_0']['kernel'])
  coverage = bnp_optax.describe_coverage(params, stats)
  # The 2-D embedding table is kernel-like: the coverage says why it is not
  # preconditioned.
  assert coverage.pop('Embed_0/embedding').startswith(
      'pass-through: a parameter of Embed, which is not a registered layer')
  assert coverage == {
      'Dense_0/bias': 'dense bias',
      'Dense_0/kernel': 'dense kernel',
      'LayerNorm_0/bias': 'pass-through',
      'LayerNorm_0/scale': 'pass-through',
  }


@pytest.mark.parametrize('route', ROUTES)
def test_masked_layers_ignore_their_statistics(route):
  case = _setup(route)
  params = case.params
  grads, stats = case.grads_and_stats(params, case.x)

  def mask(tree):  # every layer but Dense_0
    return jax.tree_util.tree_map_with_path(
        lambda path, _: layers_lib.key_path_to_tuple(path)[0] != 'Dense_0',
        tree)

  tx = optax.masked(bnp_optax.scale_by_bnp(layer_specs=case.layer_specs),
                    mask)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, layer_stats=stats)
  jax.tree.map(np.testing.assert_array_equal, _pure(updates)['Dense_0'],
               _pure(grads)['Dense_0'])
  assert set(state.inner_state.running_stats) == {
      case.layer('Dense_1'), case.layer('Dense_2')}
  masked_params = jax.tree.map(
      lambda m, p: p if m else optax.MaskedNode(), mask(params), params)
  coverage = bnp_optax.describe_coverage(masked_params, stats,
                                         layer_specs=case.layer_specs)
  assert coverage['Dense_0/kernel'] == 'masked'
  assert coverage['Dense_1/kernel'] == 'dense kernel'


def test_numpy_float64_parameters_with_x64_off_make_no_warning():
  # JAX's from-scratch MNIST example: parameters made by NumPy, float64.
  # pytest turns warnings into errors; optax's own optimizers are silent.
  assert not jax.config.jax_enable_x64
  rng = np.random.RandomState(0)
  params = [(0.1 * rng.randn(m, n), 0.1 * rng.randn(n))
            for m, n in zip((4, 5), (5, 3))]

  def predict(params, inputs):
    activations = inputs
    for w, b in params[:-1]:
      activations = jnp.tanh(jnp.dot(activations, w) + b[None, :])
    final_w, final_b = params[-1]
    return jnp.dot(activations, final_w) + final_b[None, :]

  inputs = rng.randn(6, 4)
  tx = bnp_optax.bnp(0.1, layer_specs=bnp_optax.tracing.layer_specs(
      predict, params, inputs))
  state = tx.init(params)
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {
      jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}  # statistics, count

  def loss(params):
    out, layer_stats = bnp_optax.tracing.apply(predict, params, inputs)
    return jnp.sum(out ** 2), layer_stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  updates, state = tx.update(grads, state, params, layer_stats=stats)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
