"""Flax's MNIST CNN in the harness, q^2 per layer and the --bnp-q variants."""

import jax
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax.experiments import _config
from bnp_optax.experiments import _models
from bnp_optax.experiments import _qscale
from bnp_optax.experiments import _train

N = 4


@pytest.fixture(scope='module')
def cnn():
  model = _models.make_model('flax_mnist_cnn', 'none', 10)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(N, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, N)
  params = model.init(jax.random.key(0), x[:1])['params']

  def loss(p):
    logits, stats = bnp_optax.linen.apply(model, {'params': p}, x)
    return _models.cross_entropy(logits, y), stats

  (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return params, grads, stats


def test_flax_mnist_cnn_is_the_example(cnn):
  params, _, _ = cnn
  shapes = jax.tree.map(lambda p: p.shape, params)
  assert shapes == {
      'Conv_0': {'kernel': (3, 3, 1, 32), 'bias': (32,)},
      'Conv_1': {'kernel': (3, 3, 32, 64), 'bias': (64,)},
      'Dense_0': {'kernel': (3136, 256), 'bias': (256,)},
      'Dense_1': {'kernel': (256, 10), 'bias': (10,)}}


def test_q_squared_per_layer_is_the_papers_formula(cnn):
  params, _, stats = cnn
  q2 = _qscale.q_squared_per_layer(params, stats)
  # max(k^2 c_in / N, sqrt(r s)): SAME convolutions on 28x28 and 14x14.
  expected = {'Conv_0': max(9 / N, 28.0), 'Conv_1': max(288 / N, 14.0),
              'Dense_0': max(3136 / N, 1.0), 'Dense_1': max(256 / N, 1.0)}
  assert {k: float(v['q2']) for k, v in q2.items()} == pytest.approx(expected)
  assert [v['kind'] for v in q2.values()] == ['conv', 'conv', 'dense',
                                               'dense']


@pytest.mark.parametrize('which', ['paper', 'no_conv', 'none'])
def test_undo_q_scaling_multiplies_by_q_squared(cnn, which):
  params, grads, stats = cnn
  bnp = bnp_optax.scale_by_bnp()
  plain, _ = bnp.update(grads, bnp.init(params), params, layer_stats=stats)
  tx = optax.chain(bnp_optax.scale_by_bnp(), _qscale.undo_q_scaling(which))
  undone, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
  q2 = _qscale.q_squared_per_layer(params, stats)
  for layer, info in q2.items():
    factor = 1.0
    if which == 'none' or (which == 'no_conv' and info['kind'] == 'conv'):
      factor = float(info['q2'])
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(undone[layer][leaf],
                                 plain[layer][leaf] * factor, rtol=1e-6)


def test_step_ratio(cnn):
  _, grads, _ = cnn
  halved = jax.tree.map(lambda g: g / 2, grads)
  ratio = _qscale.step_ratio(grads, halved)
  assert ratio == pytest.approx({k: 0.5 for k in grads})


def test_variants_need_bnp_and_enter_the_identity():
  with pytest.raises(ValueError, match='needs a BNP method'):
    _config.check(_train.RunConfig(method='vanilla', bnp_q='none'))
  with pytest.raises(ValueError, match='needs a BNP method'):
    _config.check(_train.RunConfig(method='bn', bnp_debias=True))
  base = _train.RunConfig(method='bnp')
  names = {base.run_name(),
           _train.RunConfig(method='bnp', bnp_q='no_conv').run_name(),
           _train.RunConfig(method='bnp', bnp_debias=True).run_name()}
  assert len(names) == 3


@pytest.mark.parametrize('config', [
    dict(method='vanilla', optimizer='momentum'),
    dict(method='bnp', optimizer='momentum', bnp_q='no_conv',
         bnp_debias=True)])
def test_one_step_in_the_harness(config):
  trainer = _train.Trainer(
      _train.RunConfig(model='flax_mnist_cnn', dataset='mnist', batch_size=N,
                       learning_rate=0.1, **config), 10, (28, 28, 1), 10)
  rng = np.random.default_rng(0)
  xs = rng.integers(0, 256, (1, N, 28, 28, 1)).astype(np.uint8)
  ys = rng.integers(0, 10, (1, N)).astype(np.int32)
  # One step per call runs without a loop; the same as a step.
  state, losses = jax.jit(trainer.chunk)(trainer.state, xs, ys,
                                         np.ones(1, bool))
  direct, loss = jax.jit(trainer.step)(trainer.state, xs[0], ys[0])
  np.testing.assert_allclose(losses, [loss], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               state[0], direct[0])
  # A masked step is a no-op.
  same, losses = jax.jit(trainer.chunk)(trainer.state, xs, ys,
                                        np.zeros(1, bool))
  assert float(losses[0]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, same[0], trainer.state[0])
