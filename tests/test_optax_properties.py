"""BNP behaves as an optax transformation should (cf. optax's common tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models


def _setup(batch_size=4, dtype=jnp.float32):
  model = models.MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(models.badly_scaled_inputs(rng, (batch_size, 6)), dtype)
  y = jnp.asarray(rng.integers(0, 3, size=batch_size))
  params = model.init(jax.random.key(0), x)['params']

  def grads_and_stats(params, x):
    def loss(params):
      out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          out.astype(jnp.float32), y)), stats
    return jax.grad(loss, has_aux=True)(params)

  return model, x, params, grads_and_stats


def test_accepts_and_ignores_unknown_extra_args():
  _, x, params, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x)
  tx = bnp_optax.scale_by_bnp()
  state = tx.init(params)
  plain = tx.update(grads, state, params, layer_stats=stats)
  extra = tx.update(grads, state, params, layer_stats=stats, loss=3.0,
                    value=jnp.ones(2))
  chex_equal = jax.tree.map(np.testing.assert_array_equal, plain, extra)
  del chex_equal


def test_no_recompilation_on_second_step_and_stable_state_dtypes():
  _, x, params, grads_and_stats = _setup()
  tx = bnp_optax.bnp(learning_rate=0.1, momentum=0.9)
  traces = []

  @jax.jit
  def step(params, state, x):
    traces.append(None)
    grads, stats = grads_and_stats(params, x)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  init_types = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  for i in range(3):
    params, state = step(params, state, x + i)
  assert len(traces) == 1
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == init_types


def test_init_sets_paper_initial_statistics_and_never_updates_them():
  _, _, params, _ = _setup()
  state = bnp_optax.scale_by_bnp().init(params)
  assert set(state.running_stats) == {'Dense_0', 'Dense_1', 'Dense_2'}
  for name, running in state.running_stats.items():
    n_in = params[name]['kernel'].shape[0]
    np.testing.assert_array_equal(running.mean, np.zeros(n_in))
    np.testing.assert_array_equal(running.variance, np.ones(n_in))
    assert running.mean.dtype == jnp.float32
  assert int(state.count) == 0


def test_chain_with_momentum_is_momentum_on_preconditioned_gradients():
  _, x, params, grads_and_stats = _setup()
  lr, beta = 0.1, 0.9
  tx = bnp_optax.bnp(learning_rate=lr, momentum=beta)
  precond = bnp_optax.scale_by_bnp()
  state, p_state = tx.init(params), precond.init(params)
  trace = jax.tree.map(jnp.zeros_like, params)
  for i in range(3):
    grads, stats = grads_and_stats(params, x * (1 + 0.1 * i))
    updates, state = jax.jit(tx.update)(grads, state, params,
                                        layer_stats=stats)
    pgrads, p_state = jax.jit(precond.update)(grads, p_state,
                                              layer_stats=stats)
    trace = jax.tree.map(lambda t, g: beta * t + g, trace, pgrads)
    jax.tree.map(
        lambda u, t: np.testing.assert_allclose(u, -lr * t, rtol=1e-6,
                                                atol=1e-7),
        updates, trace)
    params = optax.apply_updates(params, updates)


def test_works_under_inject_hyperparams_without_retracing():
  _, x, params, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x)
  injected = optax.inject_hyperparams(bnp_optax.scale_by_bnp)(
      rho=0.5, eps1=0.1, eps2=1e-3)
  plain = bnp_optax.scale_by_bnp(rho=0.5, eps1=0.1, eps2=1e-3)
  traces = []

  @jax.jit
  def update(state):
    traces.append(None)
    return injected.update(grads, state, params, layer_stats=stats)

  state = injected.init(params)
  got, new_state = update(state)
  want, _ = plain.update(grads, plain.init(params), layer_stats=stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)
  # Changing a hyperparameter in the state changes the result, same trace.
  old = state.hyperparams['rho']
  state.hyperparams['rho'] = old * 0 + 0.9  # same dtype and weak type
  changed, _ = update(state)
  want_09, _ = bnp_optax.scale_by_bnp(rho=0.9, eps1=0.1, eps2=1e-3).update(
      grads, plain.init(params), layer_stats=stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               changed, want_09)
  assert len(traces) == 1
  del new_state


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_updates_in_gradient_dtype_statistics_in_float32(dtype):
  _, x, params, grads_and_stats = _setup(dtype=dtype)
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  grads, stats = grads_and_stats(params, x)
  for s in jax.tree.leaves(stats):
    assert s.dtype == jnp.float32
  tx = bnp_optax.scale_by_bnp()
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, layer_stats=stats)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.dtype == g.dtype == dtype
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert a.dtype == b.dtype
  for running in new_state.running_stats.values():
    assert running.mean.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(running.variance)))


def test_non_finite_statistics_leave_running_statistics_unchanged():
  _, x, params, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x)
  tx = bnp_optax.scale_by_bnp()
  state = tx.init(params)
  _, state = tx.update(grads, state, layer_stats=stats)
  bad = dict(stats)
  bad['Dense_1'] = stats['Dense_1'].replace(
      mean=stats['Dense_1'].mean.at[0].set(jnp.nan),
      variance=stats['Dense_1'].variance.at[2].set(jnp.inf))
  updates, new_state = jax.jit(tx.update)(grads, state, layer_stats=bad)
  old_layer = state.running_stats['Dense_1']
  new_layer = new_state.running_stats['Dense_1']
  for field in ('mean', 'variance'):
    old, new = getattr(old_layer, field), getattr(new_layer, field)
    # The features with a non-finite statistic keep their running values...
    np.testing.assert_array_equal(new[np.array([0, 2])], old[np.array([0, 2])])
    # ... the others, and the other layers, are updated as usual.
    assert not np.any(new[np.array([1, 3, 4])] == old[np.array([1, 3, 4])])
    assert not np.array_equal(
        getattr(new_state.running_stats['Dense_0'], field),
        getattr(state.running_stats['Dense_0'], field))
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


def test_masked_layers_ignore_their_statistics():
  _, x, params, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x)
  mask = {'Dense_0': False, 'Dense_1': True, 'Dense_2': True}
  tx = optax.masked(bnp_optax.scale_by_bnp(), mask)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, layer_stats=stats)
  jax.tree.map(np.testing.assert_array_equal, updates['Dense_0'],
               grads['Dense_0'])
  assert set(state.inner_state.running_stats) == {'Dense_1', 'Dense_2'}
  masked_params = jax.tree.map(
      lambda m, p: p if m else optax.MaskedNode(), mask, params)
  coverage = bnp_optax.describe_coverage(masked_params, stats)
  assert coverage['Dense_0'] == 'masked'
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
