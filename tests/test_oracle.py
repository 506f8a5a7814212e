"""The package against an independent NumPy implementation of the paper.

The oracle applies Eq. (15) / (23) literally: it builds the matrix
``P = [[1, -mu^T], [0, I]] diag(1, 1/sigma~)`` for each layer and multiplies
``(1/q^2) P P^T`` into the stacked ``[g_b; g_w]`` of every output unit. Layer
inputs come from NumPy forward passes, not from the package's capture.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models

EPS1, EPS2 = 1e-2, 1e-4


def oracle_precondition(h, g_w, g_b, mu, var, *, positions, rho):
  """One step of Algorithm 2 (Dense) or 3 (Conv), by the matrix formula."""
  rows = h.reshape(-1, h.shape[-1])
  batch_size = h.shape[0]
  mu_h = rows.mean(axis=0)
  if rows.shape[0] == 1:
    var_h = (rows[0] - mu) ** 2  # batch-size-1 rule, running mean before
  else:
    var_h = ((rows - mu_h) ** 2).mean(axis=0)
  mu = rho * mu + (1 - rho) * mu_h
  var = rho * var + (1 - rho) * var_h
  sigma_tilde = np.sqrt(var + EPS1 * var.max() + EPS2)
  fan_in = int(np.prod(g_w.shape[:-1]))
  q2 = max(fan_in / batch_size, np.sqrt(positions))
  # Columns of W in the paper's vec order: (window..., channel) row-major,
  # which is how a Flax kernel reshapes to (fan_in, n_out).
  mu_full = np.broadcast_to(mu, g_w.shape[:-1]).reshape(-1)
  sigma_full = np.broadcast_to(sigma_tilde, g_w.shape[:-1]).reshape(-1)
  w_cols = g_w.reshape(fan_in, -1)
  if g_b is None:
    d = np.diag(1 / sigma_full)
    new_w = (d @ d.T @ w_cols) / q2
    return new_w.reshape(g_w.shape), None, mu, var
  u = np.eye(fan_in + 1)
  u[0, 1:] = -mu_full
  p = u @ np.diag(np.concatenate([[1.0], 1 / sigma_full]))
  stacked = np.concatenate([g_b[None, :], w_cols], axis=0)
  result = (p @ p.T @ stacked) / q2
  return result[1:].reshape(g_w.shape), result[0], mu, var


def _rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


MODELS = {
    'mlp': (models.MLP, (6,), models.mlp_layer_inputs),
    'cnn': (models.CNN, (6, 6, 2), models.cnn_layer_inputs),
}


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
@pytest.mark.parametrize('batch_size', [1, 2, 7])
@pytest.mark.parametrize('rho', [0.99, 0.5])
def test_matches_numpy_oracle_over_several_steps(model_name, batch_size, rho):
  model_cls, in_shape, np_forward = MODELS[model_name]
  model = model_cls()
  lr, num_steps = 0.05, 4
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x0 = jnp.asarray(models.badly_scaled_inputs(rng, (batch_size, *in_shape)))
    params = model.init(jax.random.key(1), x0)['params']
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    tx = optax.chain(bnp_optax.scale_by_bnp(rho=rho), optax.sgd(lr))
    opt_state = tx.init(params)

    def loss(params, x, y, collect):
      if collect:
        out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      else:
        out, stats = model.apply({'params': params}, x), None
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          out, y)), stats

    @jax.jit
    def step(params, opt_state, x, y):
      grads, stats = jax.grad(
          functools.partial(loss, collect=True), has_aux=True)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     layer_stats=stats)
      return optax.apply_updates(params, updates), opt_state

    raw_grad = jax.jit(jax.grad(
        lambda p, x, y: loss(p, x, y, collect=False)[0]))

    np_params = jax.tree.map(np.asarray, params)
    np_running = {
        name: (np.zeros(p['kernel'].shape[-2]), np.ones(p['kernel'].shape[-2]))
        for name, p in np_params.items()
    }
    for _ in range(num_steps):
      x = models.badly_scaled_inputs(rng, (batch_size, *in_shape))
      y = rng.integers(0, 3, size=batch_size)
      # Oracle step: raw gradients at the oracle's own parameters.
      grads = jax.tree.map(np.asarray, raw_grad(np_params, x, y))
      forward = np_forward(np_params, x)
      inputs = forward[0]
      positions = forward[1] if model_name == 'cnn' else {
          k: 1 for k in inputs}
      new_params = {}
      for name, g in grads.items():
        mu, var = np_running[name]
        g_w, g_b, mu, var = oracle_precondition(
            inputs[name], g['kernel'], g.get('bias'), mu, var,
            positions=positions[name], rho=rho)
        np_running[name] = (mu, var)
        new_params[name] = {'kernel': np_params[name]['kernel'] - lr * g_w}
        if g_b is not None:
          new_params[name]['bias'] = np_params[name]['bias'] - lr * g_b
      np_params = new_params
      # Package step.
      params, opt_state = step(params, opt_state, jnp.asarray(x),
                               jnp.asarray(y))
      for name in np_params:
        for leaf in np_params[name]:
          assert _rel_err(params[name][leaf], np_params[name][leaf]) < 1e-10
        running = opt_state[0].running_stats[name]
        assert running.mean.dtype == jnp.float64
        assert _rel_err(running.mean, np_running[name][0]) < 1e-10
        assert _rel_err(running.variance, np_running[name][1]) < 1e-10


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
def test_preconditioned_gradient_matches_oracle_in_float32(model_name):
  """One step in float32: the claim there is float32 rounding, ~1e-6."""
  model_cls, in_shape, np_forward = MODELS[model_name]
  model = model_cls()
  rng = np.random.default_rng(3)
  x = models.badly_scaled_inputs(rng, (5, *in_shape)).astype(np.float32)
  y = rng.integers(0, 3, size=5)
  params = model.init(jax.random.key(0), x)['params']

  def loss(params):
    out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        out, y)), stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  tx = bnp_optax.scale_by_bnp()
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), layer_stats=stats)
  forward = np_forward(jax.tree.map(np.asarray, params), x.astype(np.float64))
  positions = forward[1] if model_name == 'cnn' else {k: 1 for k in forward[0]}
  for name, g in grads.items():
    n_in = g['kernel'].shape[-2]
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    g_w, g_b, _, _ = oracle_precondition(
        forward[0][name], g['kernel'], g.get('bias'), np.zeros(n_in),
        np.ones(n_in), positions=positions[name], rho=0.99)
    assert updates[name]['kernel'].dtype == jnp.float32
    assert _rel_err(updates[name]['kernel'], g_w) < 1e-5
    if g_b is not None:
      assert _rel_err(updates[name]['bias'], g_b) < 1e-5
