"""Patterns optax and Flax users write every day, applied to BNP.

Abstract initialisation (orbax restore targets, sharded init), sharding
helpers, hyperparameters that only exist at run time, and the errors that
point to the fix when a training loop drops the statistics.
"""

import re

from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models


def _setup(n=4):
  model = models.MLP()
  x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0), (n, 6)),
                  jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  return model, params, x


_FACTORIES = {
    'scale_by_bnp': lambda: bnp_optax.scale_by_bnp(),
    'bnp': lambda: bnp_optax.bnp(0.1, momentum=0.9),
    'multi_steps': lambda: bnp_optax.multi_steps(
        bnp_optax.bnp(0.1, momentum=0.9), every_k_schedule=2),
}


@pytest.mark.parametrize('name', sorted(_FACTORIES))
def test_init_under_eval_shape_matches_concrete_init(name):
  _, params, _ = _setup()
  abstract = jax.eval_shape(lambda p: _FACTORIES[name]().init(p), params)
  concrete = _FACTORIES[name]().init(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(abstract) == shapes(concrete)


def test_train_state_created_under_jit():
  model, params, x = _setup()

  @jax.jit
  def create_train_state(rng):
    variables = model.init(rng, x)
    return bnp_optax.linen.TrainState.create(
        apply_fn=model.apply, params=variables['params'],
        tx=bnp_optax.bnp(0.1, momentum=0.9))

  state = create_train_state(jax.random.key(0))
  assert int(state.step) == 0
  assert set(state.opt_state[0].running_stats) == set(params)


def test_nnx_optimizer_under_eval_shape():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(
      lambda: nnx.Optimizer(model, bnp_optax.bnp(0.1), wrt=nnx.Param))
  running = abstract.opt_state[0].running_stats
  assert running['<root>'].mean.shape == (3,)


@pytest.mark.parametrize('kwargs, message', [
    ({'eps1': float('inf')}, 'eps1 must be finite, got inf'),
    ({'eps2': float('nan')}, 'eps2 must be finite, got nan'),
    ({'eps1': np.float32(-1)}, 'eps1 must be >= 0, got -1.0'),
    ({'rho': np.array(1.0)}, 'rho must be in [0, 1), got 1.0'),
])
def test_bad_values_are_refused_also_inside_a_trace(kwargs, message):
  _, params, _ = _setup()
  with pytest.raises(ValueError, match=re.escape(message)):
    bnp_optax.scale_by_bnp(**kwargs)
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(lambda p: bnp_optax.bnp(0.1, **kwargs).init(p), params)


def _inject_and_step(steps, x, **hyperparameters):
  """``scale_by_bnp`` under inject_hyperparams with values set at run time."""
  model, params, _ = _setup()
  tx = optax.inject_hyperparams(bnp_optax.scale_by_bnp)(rho=0.5)
  state = tx.init(params)
  for name, value in hyperparameters.items():
    state.hyperparams[name] = jnp.asarray(value)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
    updates, state = update(grads, state, params, layer_stats=stats)
  return updates, state.inner_state


def test_traced_rho_above_one_is_clipped_not_extrapolated():
  _, _, x = _setup()
  updates, state = _inject_and_step(20, 10 * x, rho=1.5)
  for running in state.running_stats.values():
    # rho is clipped to 1: the statistics stay at their initial values
    # (rho = 1.5 drove the variance negative).
    np.testing.assert_array_equal(running.mean, 0)
    np.testing.assert_array_equal(running.variance, 1)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_traced_nan_hyperparameters_keep_state_and_updates_finite():
  _, _, x = _setup()
  updates, state = _inject_and_step(3, x, rho=float('nan'),
                                    eps1=float('nan'), eps2=float('nan'))
  for running in state.running_stats.values():
    np.testing.assert_array_equal(running.mean, 0)  # frozen: rho NaN -> 1
    np.testing.assert_array_equal(running.variance, 1)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_traced_negative_eps_is_clipped_to_zero():
  _, _, x = _setup()
  clipped, _ = _inject_and_step(2, x, eps1=-5.0, eps2=-5.0)
  zero, _ = _inject_and_step(2, x, eps1=0.0, eps2=0.0)
  jax.tree.map(np.testing.assert_array_equal, clipped, zero)


def test_zero_regulariser_on_a_constant_input_gives_finite_updates():
  _, _, x = _setup()
  constant = jnp.ones_like(x)
  updates, state = _inject_and_step(1, constant, rho=0.0, eps1=0.0, eps2=0.0)
  for u in jax.tree.leaves(updates):
    assert np.all(np.isfinite(u)), u
  for leaf in jax.tree.leaves(state.running_stats):
    assert np.all(np.isfinite(leaf))


@pytest.mark.parametrize('name', sorted(_FACTORIES))
def test_map_params_derives_state_shardings_from_parameter_shardings(name):
  _, params, x = _setup()
  tx = _FACTORIES[name]()
  state = tx.init(params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_shardings = jax.tree.map(lambda _: replicated, params)
  state_shardings = optax.tree.map_params(
      tx, lambda _, sharding: sharding, state, param_shardings,
      transform_non_params=lambda _: replicated)
  # The result is a valid sharding tree (a prefix of the state) for jit.
  placed = jax.device_put(state, state_shardings)
  jax.tree.map(np.testing.assert_array_equal, placed, state)
  # f sees only parameter-shaped trees, never the running statistics.
  seen = []
  optax.tree.map_params(tx, lambda p: seen.append(p.shape), state)
  param_shapes = sorted(p.shape for p in jax.tree.leaves(params))
  if name == 'scale_by_bnp':
    assert not seen
  else:
    assert sorted(seen[:len(param_shapes)]) == param_shapes
  assert all(s in param_shapes for s in seen)


def test_map_params_leaves_running_statistics_to_transform_non_params():
  _, params, _ = _setup()
  tx = bnp_optax.bnp(0.1)
  state = tx.init(params)
  received = []
  optax.tree.map_params(
      tx, lambda p: p, state,
      transform_non_params=lambda v: received.append(v) or v)
  stats = [v for v in received if isinstance(v, dict)]
  assert len(stats) == 1 and set(stats[0]) == set(params)
  assert isinstance(stats[0]['Dense_0'], bnp_optax.RunningStats)


def test_multi_steps_has_updated_like_optax():
  model, params, x = _setup()
  tx = bnp_optax.multi_steps(bnp_optax.bnp(0.1), every_k_schedule=2)
  reference = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2)
  state, ref_state = tx.init(params), reference.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, stats = bnp_optax.linen.apply(model, {'params': params}, x)
  for _ in range(4):
    _, state = tx.update(grads, state, params, layer_stats=stats)
    _, ref_state = reference.update(grads, ref_state, params)
    assert bool(tx.has_updated(state)) == bool(
        reference.has_updated(ref_state))


def test_missing_statistics_error_names_the_fix():
  model, params, x = _setup()
  tx = bnp_optax.bnp(0.1)
  flax_state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError) as error:
    flax_state.apply_gradients(grads=grads)
  message = str(error.value)
  assert 'bnp_optax.linen.TrainState' in message
  assert 'optimizer.update(model, grads, layer_stats=layer_stats)' in message
  assert 'bnp_optax.multi_steps' in message


def test_nnx_optimizer_without_statistics_names_the_fix():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, bnp_optax.bnp(0.1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3)))))(model)
  with pytest.raises(ValueError, match=re.escape(
      'optimizer.update(model, grads, layer_stats=layer_stats)')):
    optimizer.update(model, grads)


@pytest.mark.parametrize('rows', [1, 64, 300])  # GEMV and reduction paths
@pytest.mark.parametrize('split', [1, 3, 7])
def test_variance_of_a_large_mean_matches_float64(rows, split):
  rng = np.random.default_rng(split)
  x = (1e6 + rng.standard_normal((rows * split, 16))).astype(np.float32)
  want = x.astype(np.float64).var(0)
  whole = jax.jit(bnp_optax.input_statistics)(x)
  np.testing.assert_allclose(whole.variance, want, rtol=1e-6)
  parts = [bnp_optax.input_statistics(p) for p in np.array_split(x, split)]
  merged = bnp_optax.merge_statistics(parts)
  np.testing.assert_allclose(merged.variance, want, rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(merged.mean, np.float64)
      + np.asarray(merged.mean_residual, np.float64),
      x.astype(np.float64).mean(0), rtol=0, atol=1e-6)


def test_variance_of_a_large_mean_across_devices_matches_float64():
  rng = np.random.default_rng(0)
  x = (1e6 + rng.standard_normal((8, 8, 16))).astype(np.float32)
  flat = x.reshape(-1, 16).astype(np.float64)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  spec = jax.sharding.PartitionSpec('data')

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
  def reduce(x):
    stats = bnp_optax.all_reduce_statistics(
        bnp_optax.input_statistics(x[0]), 'data')
    return stats.variance[None], stats.mean_residual[None], stats.mean[None]

  variance, residual, mean = reduce(x)
  np.testing.assert_allclose(variance[0], flat.var(0), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(mean[0], np.float64)
      + np.asarray(residual[0], np.float64), flat.mean(0), atol=1e-6)


def test_convolution_statistics_of_a_large_mean_match_float64():
  rng = np.random.default_rng(1)
  x = (-3e5 + 0.5 * rng.standard_normal((4, 9, 9, 3))).astype(np.float32)
  stats = jax.jit(lambda x: bnp_optax.input_statistics(
      x, batch_axes=(0,), positions=81))(x)
  flat = x.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(stats.variance, flat.var(0), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(stats.mean, np.float64)
      + np.asarray(stats.mean_residual, np.float64), flat.mean(0),
      rtol=0, atol=1e-6)


def test_variance_of_a_large_mean_on_an_explicitly_sharded_batch():
  # jax.make_mesh's default axis types are explicit: the first row of a
  # batch sharded that way cannot be sliced, the statistics shift by the
  # column maximum instead.
  rng = np.random.default_rng(2)
  x = (1e6 + rng.standard_normal((64, 16))).astype(np.float32)
  mesh = jax.make_mesh((8,), ('batch',))
  sharded = jax.device_put(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch')))
  stats = jax.jit(bnp_optax.input_statistics)(sharded)
  flat = x.astype(np.float64)
  np.testing.assert_allclose(stats.variance, flat.var(0), rtol=1e-6)
  np.testing.assert_allclose(
      np.asarray(stats.mean, np.float64)
      + np.asarray(stats.mean_residual, np.float64), flat.mean(0), atol=1e-6)
