"""A few training steps through every public entry point.

Part of the full suite, and the whole of the check that the minimum versions
declared in pyproject.toml work (`bash scripts/test_floors.sh`, run by CI):
so it uses nothing newer than those floors.
"""

from flax import nnx
from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
import bnp_optax.linen
import bnp_optax.nnx


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _data(n=4):
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 + 10 * rng.normal(size=(n, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=n))
  return x, y


def _linen_training(steps, tx=None, state=None):
  model = _CNN()
  x, y = _data()
  params = model.init(jax.random.key(0), x)['params']
  tx = tx or bnp_optax.bnp(0.05, momentum=0.9)
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state):
    def loss(params):
      out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          out, y).mean(), stats
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, losses


def test_linen_training_lowers_the_loss():
  _, state, losses = _linen_training(8)
  assert losses[-1] < losses[0]
  assert set(state[0].running_stats) == {'Conv_0', 'Dense_0', 'Dense_1'}


def test_nnx_training_lowers_the_loss():
  model = nnx.Sequential(
      nnx.Linear(50, 8, rngs=nnx.Rngs(0)), nnx.relu,
      nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  x, y = _data()
  x = x.reshape(x.shape[0], -1)
  optimizer = nnx.Optimizer(model, bnp_optax.bnp(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      out, stats = bnp_optax.nnx.apply(model, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          out, y).mean(), stats
    (value, stats), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads, layer_stats=stats)
    return value

  losses = [float(step(model, optimizer)) for _ in range(8)]
  assert losses[-1] < losses[0]


@pytest.mark.parametrize('backend', ['flax.serialization', 'orbax'])
def test_checkpoint_round_trip_continues_identically(backend, tmp_path):
  tx = bnp_optax.multi_steps(bnp_optax.bnp(0.05, momentum=0.9), 2)
  _, mid, _ = _linen_training(3, tx)
  target = jax.eval_shape(lambda: mid)
  target = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), target)
  if backend == 'orbax':
    ocp = pytest.importorskip('orbax.checkpoint')
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'state', mid)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / 'state', target)
    checkpointer.close()
  else:
    restored = serialization.from_bytes(target, serialization.to_bytes(mid))
  assert jax.tree.structure(restored) == jax.tree.structure(mid)
  # Training goes on from the restored state exactly as from the saved one.
  _, after_restore, _ = _linen_training(3, tx, state=restored)
  _, after_saved, _ = _linen_training(3, tx, state=mid)
  jax.tree.map(np.testing.assert_array_equal, after_restore, after_saved)
