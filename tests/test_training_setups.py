"""BNP in the training set-ups people have.

Accumulation, masking, non-finite steps, checkpoints, TrainState, lax.cond.
"""

import functools
import re

from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models


def _batch(rng, n):
  x = models.badly_scaled_inputs(rng, (n, 6)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.integers(0, 3, size=n))


def _grads_and_stats(model, params, x, y):
  def loss(params):
    out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        out, y)), stats
  return jax.grad(loss, has_aux=True)(params)


def _close(a, b, rtol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-6), a, b)


@pytest.mark.parametrize('k', [1, 3])
def test_multi_steps_equals_one_step_on_the_whole_batch(k):
  model = models.MLP()
  rng = np.random.default_rng(0)
  x, y = _batch(rng, 2 * k)
  params = model.init(jax.random.key(0), x)['params']
  big = bnp_optax.bnp(0.1)
  want_updates, want_state = big.update(
      *_grads_and_stats(model, params, x, y)[:1], big.init(params), params,
      layer_stats=_grads_and_stats(model, params, x, y)[1])
  tx = bnp_optax.multi_steps(bnp_optax.bnp(0.1), every_k_schedule=k)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(k):
    grads, stats = _grads_and_stats(model, params, x[2 * i:2 * i + 2],
                                    y[2 * i:2 * i + 2])
    updates, state = update(grads, state, params, layer_stats=stats)
    if i < k - 1:
      assert all(not np.any(u) for u in jax.tree.leaves(updates))
  _close(updates, want_updates)
  _close(state.inner.inner_opt_state[0].running_stats,
         want_state[0].running_stats)
  # The accumulator is empty again, ready for the next k micro-steps.
  for s in state.accumulated_stats.values():
    assert float(s.count) == 0


def test_multi_steps_without_the_wrapper_would_lose_statistics():
  """Plain optax.MultiSteps sees only the last micro-step: documented why."""
  model = models.MLP()
  rng = np.random.default_rng(1)
  x, y = _batch(rng, 4)
  params = model.init(jax.random.key(0), x)['params']
  plain = optax.MultiSteps(bnp_optax.bnp(0.1), every_k_schedule=2)
  wrapped = bnp_optax.multi_steps(bnp_optax.bnp(0.1), every_k_schedule=2)
  s_plain, s_wrapped = plain.init(params), wrapped.init(params)
  for i in range(2):
    grads, stats = _grads_and_stats(model, params, x[2 * i:2 * i + 2],
                                    y[2 * i:2 * i + 2])
    _, s_plain = plain.update(grads, s_plain, params, layer_stats=stats)
    _, s_wrapped = wrapped.update(grads, s_wrapped, params,
                                  layer_stats=stats)
  mean_plain = s_plain.inner_opt_state[0].running_stats['Dense_0'].mean
  mean_wrapped = s_wrapped.inner.inner_opt_state[0].running_stats[
      'Dense_0'].mean
  np.testing.assert_allclose(mean_wrapped, 0.01 * np.mean(x, 0), rtol=1e-5)
  assert not np.allclose(mean_plain, mean_wrapped, rtol=1e-3)


def test_partition_bnp_on_some_layers_adam_on_others():
  model = models.MLP()
  rng = np.random.default_rng(2)
  x, y = _batch(rng, 5)
  params = model.init(jax.random.key(0), x)['params']
  labels = {'Dense_0': {'kernel': 'adam', 'bias': 'adam'},
            'Dense_1': {'kernel': 'bnp'},
            'Dense_2': {'kernel': 'bnp', 'bias': 'bnp'}}
  tx = optax.partition({'adam': optax.adam(1e-3), 'bnp': bnp_optax.bnp(0.1)},
                       labels)
  state = tx.init(params)
  grads, stats = _grads_and_stats(model, params, x, y)
  updates, state = jax.jit(tx.update)(grads, state, params,
                                      layer_stats=stats)
  want, _ = bnp_optax.bnp(0.1).update(
      grads, bnp_optax.bnp(0.1).init(params), params, layer_stats=stats)
  _close(updates['Dense_2'], want['Dense_2'])
  _close(updates['Dense_1'], want['Dense_1'])
  adam_updates, _ = optax.adam(1e-3).update(
      grads['Dense_0'], optax.adam(1e-3).init(params['Dense_0']))
  _close(updates['Dense_0'], adam_updates)


def test_apply_if_finite_leaves_statistics_untouched_on_bad_steps():
  model = models.MLP()
  rng = np.random.default_rng(3)
  x, y = _batch(rng, 4)
  params = model.init(jax.random.key(0), x)['params']
  tx = optax.apply_if_finite(bnp_optax.bnp(0.1), max_consecutive_errors=5)
  state = tx.init(params)
  grads, stats = _grads_and_stats(model, params, x, y)
  _, state = tx.update(grads, state, params, layer_stats=stats)
  before = state.inner_state[0].running_stats
  bad_grads = jax.tree.map(lambda g: g.at[...].set(jnp.nan), grads)
  updates, state = jax.jit(tx.update)(bad_grads, state, params,
                                      layer_stats=stats)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal,
               state.inner_state[0].running_stats, before)
  assert int(state.notfinite_count) == 1


def test_state_dtypes_survive_lax_cond():
  """A state passed through lax.cond must keep its dtypes (bf16 params)."""
  model = models.MLP()
  rng = np.random.default_rng(4)
  x, y = _batch(rng, 4)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                        model.init(jax.random.key(0), x)['params'])
  tx = bnp_optax.bnp(0.1, momentum=0.9)
  state = tx.init(params)
  grads, stats = _grads_and_stats(model, params, x.astype(jnp.bfloat16), y)

  @jax.jit
  def maybe_update(flag, state):
    return jax.lax.cond(
        flag, lambda s: tx.update(grads, s, params, layer_stats=stats)[1],
        lambda s: s, state)

  new_state = maybe_update(True, state)
  same = maybe_update(False, state)
  dtypes = lambda t: jax.tree.map(lambda a: a.dtype, t)
  assert dtypes(new_state) == dtypes(state) == dtypes(same)
  assert new_state[0].running_stats['Dense_0'].mean.dtype == jnp.float32


def _train(tx, params, batches, model, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, x, y):
    grads, stats = _grads_and_stats(model, params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  for x, y in batches:
    params, state = step(params, state, x, y)
  return params, state


# Every public state, each mid-way (multi_steps stops mid-accumulation).
_OPTIMIZERS = {
    'bnp': lambda: bnp_optax.bnp(0.1, momentum=0.9),
    'scale_by_bnp+adam': lambda: optax.chain(
        bnp_optax.scale_by_bnp(debias=True), optax.adam(1e-2)),
    'multi_steps': lambda: bnp_optax.multi_steps(
        bnp_optax.bnp(0.1, momentum=0.9), every_k_schedule=2),
    'inject_hyperparams': lambda: optax.inject_hyperparams(bnp_optax.bnp)(
        learning_rate=0.1, rho=0.9),
}


@pytest.mark.parametrize('optimizer', sorted(_OPTIMIZERS))
@pytest.mark.parametrize('backend', ['flax.serialization', 'orbax'])
def test_checkpoint_mid_training_continues_bit_identically(
    backend, optimizer, tmp_path):
  model = models.MLP()
  rng = np.random.default_rng(5)
  batches = [_batch(rng, 3) for _ in range(6)]
  params = model.init(jax.random.key(0), batches[0][0])['params']
  tx = _OPTIMIZERS[optimizer]()
  want_params, want_state = _train(tx, params, batches, model)
  mid_params, mid_state = _train(tx, params, batches[:3], model)
  target = (jax.tree.map(jnp.zeros_like, mid_params),
            jax.tree.map(jnp.zeros_like, mid_state))
  if backend == 'orbax':
    import orbax.checkpoint as ocp  # the test extra installs it
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / 'ckpt', (mid_params, mid_state))
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(tmp_path / 'ckpt', target)
  else:
    restored = serialization.from_bytes(
        target, serialization.to_bytes((mid_params, mid_state)))
  got_params, got_state = _train(tx, restored[0], batches[3:], model,
                                 state=restored[1])
  jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_state_restored_into_a_changed_model_is_refused():
  rng = np.random.default_rng(6)
  x, y = _batch(rng, 3)
  old_model = models.MLP()
  params = old_model.init(jax.random.key(0), x)['params']
  tx = bnp_optax.bnp(0.1)
  saved = serialization.to_state_dict(tx.init(params))

  class Wider(nn.Module):  # Dense_1 now sees 7 features instead of 5
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(7, name='Dense_0')(x))
      x = nn.relu(nn.Dense(4, use_bias=False, name='Dense_1')(x))
      return nn.Dense(3, name='Dense_2')(x)

  new_model = Wider()
  new_params = new_model.init(jax.random.key(0), x)['params']
  restored = serialization.from_state_dict(tx.init(params), saved)
  grads, stats = _grads_and_stats(new_model, new_params, x, y)
  with pytest.raises(ValueError, match=re.escape(
      "layer 'Dense_1': the optimizer state holds statistics of shape (5,), "
      'but the layer, a dense kernel (7, 4)')):
    tx.update(grads, restored, new_params, layer_stats=stats)
  # Restoring into a target made for the new model fails in Flax itself.
  with pytest.raises(ValueError):
    serialization.from_state_dict(
        tx.init({'Other': new_params['Dense_0']}), saved)


def test_train_state_forwards_layer_stats():
  model = models.MLP()
  rng = np.random.default_rng(7)
  x, y = _batch(rng, 4)
  params = model.init(jax.random.key(0), x)['params']
  tx = bnp_optax.bnp(0.1)
  state = bnp_optax.linen.TrainState.create(apply_fn=model.apply,
                                            params=params, tx=tx)
  grads, stats = _grads_and_stats(model, params, x, y)
  state = jax.jit(functools.partial(state.apply_gradients.__func__))(
      state, grads=grads, layer_stats=stats)
  want_params, _ = _train(tx, params, [(x, y)], model)
  _close(state.params, want_params)
  assert int(state.step) == 1
  with pytest.raises(ValueError, match='needs the keyword argument'):
    state.apply_gradients(grads=grads)


def test_debias_removes_the_pull_of_the_initial_statistics():
  model = models.MLP()
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):  # (avg - rho) / (1 - rho) amplifies rounding
    x = jnp.asarray(models.badly_scaled_inputs(rng, (16, 6)))
    y = jnp.asarray(rng.integers(0, 3, size=16))
    params = jax.tree.map(lambda p: p.astype(jnp.float64),
                          model.init(jax.random.key(0), x)['params'])
    grads, stats = _grads_and_stats(model, params, x, y)
    init = bnp_optax.scale_by_bnp().init(params)
    # After one step with debias, the statistics used are the batch's own:
    # the same as rho = 0 without debias.
    debiased, state_debiased = bnp_optax.scale_by_bnp(debias=True).update(
        grads, init, layer_stats=stats)
    batch_only, _ = bnp_optax.scale_by_bnp(rho=0.0).update(
        grads, init, layer_stats=stats)
    _close(debiased, batch_only, rtol=1e-10)
    default, state = bnp_optax.scale_by_bnp().update(
        grads, init, layer_stats=stats)
    assert not np.allclose(default['Dense_0']['kernel'],
                           batch_only['Dense_0']['kernel'], rtol=1e-2)
    # The state holds the plain running averages either way.
    _close(state_debiased.running_stats, state.running_stats, rtol=1e-12)
