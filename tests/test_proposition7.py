"""Proposition 7: one BNP step equals one step of post-activation BN(0, 1).

A network whose layer normalises its input with the batch statistics,
``a = ((h - mu_H) / sigma_H) K + b``, with no gradient through ``mu_H,
sigma_H``, is the vanilla network with ``K^ = diag(1/sigma_H) K`` and
``b^ = b - (mu_H / sigma_H) K``. One gradient step of the BN network, mapped
through that change of variables, equals one BNP step of the vanilla network
when BNP uses the batch's own statistics (``rho = 0``), no regularisation
(``eps1 = eps2 = 0``) and ``N >= n_in`` so that ``q = 1``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models

N_IN, N_HIDDEN, N_OUT = 4, 5, 3


class Vanilla(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    if self.depth == 2:
      x = nn.relu(nn.Dense(N_IN, name='Dense_0')(x))
    return nn.Dense(N_OUT, name='Normalised')(x)


def bn_forward(params, x, depth):
  """The BN(0, 1) network on the same parameters, statistics constant."""
  h = x
  if depth == 2:
    layer = params['Dense_0']
    h = jax.nn.relu(h @ layer['kernel'] + layer['bias'][None, :])
  mu = jax.lax.stop_gradient(h.mean(axis=0))
  sigma = jax.lax.stop_gradient(h.std(axis=0))
  normalised = (h - mu[None, :]) / sigma[None, :]
  layer = params['Normalised']
  return normalised @ layer['kernel'] + layer['bias'][None, :], (mu, sigma)


def loss_of(out, y):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))


def to_vanilla(layer, mu, sigma):
  kernel = layer['kernel'] / sigma[:, None]
  return {'kernel': kernel, 'bias': layer['bias'] - mu @ kernel}


@pytest.mark.parametrize('depth', [1, 2])
@pytest.mark.parametrize('batch_size', [N_IN, 9])
def test_one_bnp_step_equals_one_bn_step(depth, batch_size):
  lr = 0.3
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    in_features = 6 if depth == 2 else N_IN
    x = jnp.asarray(
        models.badly_scaled_inputs(rng, (batch_size, in_features)))
    y = jnp.asarray(rng.integers(0, N_OUT, size=batch_size))
    model = Vanilla(depth)
    bn_params = model.init(jax.random.key(0), x)['params']
    bn_params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1, bn_params)

    # One gradient step of the BN network.
    grads = jax.grad(lambda p: loss_of(bn_forward(p, x, depth)[0], y))(
        bn_params)
    bn_next = jax.tree.map(lambda p, g: p - lr * g, bn_params, grads)
    _, (mu, sigma) = bn_forward(bn_params, x, depth)
    expected = dict(bn_next)
    expected['Normalised'] = to_vanilla(bn_next['Normalised'], mu, sigma)

    # One BNP step of the equivalent vanilla network, on the normalised layer
    # only (the first layer, when there is one, is masked out of BNP).
    vanilla = dict(bn_params)
    vanilla['Normalised'] = to_vanilla(bn_params['Normalised'], mu, sigma)
    mask = {name: {leaf: name == 'Normalised' for leaf in layer}
            for name, layer in vanilla.items()}
    tx = optax.chain(
        optax.masked(bnp_optax.scale_by_bnp(rho=0.0, eps1=0.0, eps2=0.0),
                     mask),
        optax.sgd(lr))

    def vanilla_loss(p):
      out, stats = bnp_optax.linen.apply(model, {'params': p}, x)
      return loss_of(out, y), stats

    @jax.jit
    def step(p, state):
      g, stats = jax.grad(vanilla_loss, has_aux=True)(p)
      updates, state = tx.update(g, state, p, layer_stats=stats)
      return optax.apply_updates(p, updates)

    got = step(vanilla, tx.init(vanilla))
    # The mapping is exact algebra: the two agree to float64 rounding.
    for name in expected:
      for leaf in expected[name]:
        np.testing.assert_allclose(
            got[name][leaf], expected[name][leaf], rtol=1e-10, atol=1e-12)
    # ... and the step is not plain SGD: preconditioning changed it.
    sgd_step = jax.tree.map(
        lambda p, g: p - lr * g, vanilla, jax.grad(
            lambda p: vanilla_loss(p)[0])(vanilla))
    assert not np.allclose(got['Normalised']['kernel'],
                           sgd_step['Normalised']['kernel'], rtol=1e-3)
