"""BN with 4 Things (bnp_optax.experiments._bn4) against NumPy float64.

Ghost BN, Batch + Group Norm (both readings), inference example weighing,
the weight decay on the layers' scale and offset only, and short bn4 runs of
the harness at batch sizes 1, 2 and 128.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnp_optax.experiments import _bn4
from bnp_optax.experiments import _config
from bnp_optax.experiments import _data
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _plot
from bnp_optax.experiments import _results
from bnp_optax.experiments import _suites
from bnp_optax.experiments import _train

_EPS = 1e-3
_GN_EPS = 1e-5
_TOL = dict(rtol=2e-5, atol=2e-5)


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  # An offset and a scale per channel, so that centring matters.
  c = shape[-1]
  return (rng.normal(size=shape) * rng.uniform(0.5, 3.0, c)
          + rng.normal(size=c) * 2).astype(np.float32)


def _affine(features, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0.5, 1.5, features).astype(np.float32),
          rng.normal(size=features).astype(np.float32))


def _np_moments(x, group_size):
  """Mean, variance over every axis of ``x[n, ..., C]`` but groups: ``[G]``."""
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, c // group_size, group_size)
  return xg.mean(axis=(0, 1, 3)), xg.var(axis=(0, 1, 3))


def _np_normalise(x, mean, var, group_size, eps):
  c = x.shape[-1]
  mean = np.repeat(mean, group_size, axis=-1)
  var = np.repeat(var, group_size, axis=-1)
  shape = (mean.shape[0] if mean.ndim == 2 else 1,) + (1,) * (x.ndim - 2) + (
      c,)
  return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)


def _np_train(x, ghost, group_size=1, combine='joint'):
  """float64 reference of the training forward pass and the stats update."""
  x = x.astype(np.float64)
  n = x.shape[0]
  if group_size > 1 and combine == 'sequential':
    x = np.concatenate([
        _np_normalise(xi[None], *_np_moments(xi[None], group_size),
                      group_size, _GN_EPS) for xi in x])
    group_size = 1
  k = 1 if ghost is None or n <= ghost else -(-n // ghost)
  parts = np.array_split(np.arange(n), k)
  y = np.empty_like(x)
  means, variances = [], []
  for idx in parts:
    m, v = _np_moments(x[idx], group_size)
    y[idx] = _np_normalise(x[idx], m, v, group_size, _EPS)
    means.append(m * len(idx) / n)
    variances.append(v * len(idx) / n)
  batch_mean = np.repeat(np.sum(means, 0), group_size)
  batch_var = np.repeat(np.sum(variances, 0), group_size)
  return y, 0.01 * batch_mean, 0.99 + 0.01 * batch_var


def _apply_train(layer, x, scale, bias):
  variables = layer.init(jax.random.key(0), x)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': variables['batch_stats']}
  fn = jax.jit(lambda v, x: layer.apply(v, x, mutable=['batch_stats']))
  y, state = fn(variables, x)
  return np.asarray(y), state['batch_stats']


_SHAPES = [(5, 5, 8), (8,)]  # a convolution's feature map, a Dense layer's


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('batch,ghost', [
    (8, 4), (8, 2), (12, 4), (10, 4), (7, 3), (6, None), (4, 16)])
def test_ghost_bn_equals_numpy_per_ghost_batch(batch, ghost, shape):
  x = _inputs((batch,) + shape)
  scale, bias = _affine(shape[-1])
  layer = _bn4.BN4(use_running_average=False, ghost_batch_size=ghost)
  y, stats = _apply_train(layer, x, scale, bias)
  y_ref, mean_ref, var_ref = _np_train(x, ghost)
  np.testing.assert_allclose(y, y_ref * scale + bias, **_TOL)
  np.testing.assert_allclose(stats['mean'], mean_ref, **_TOL)
  np.testing.assert_allclose(stats['var'], var_ref, **_TOL)


def test_ghost_segments():
  np.testing.assert_array_equal(_bn4.ghost_segments(8, 4), [0] * 4 + [1] * 4)
  # 10 examples, ghost size 4: ceil(10 / 4) = 3 ghost batches of 4, 3, 3.
  np.testing.assert_array_equal(_bn4.ghost_segments(10, 4),
                                [0] * 4 + [1] * 3 + [2] * 3)
  np.testing.assert_array_equal(_bn4.ghost_segments(3, 16), [0, 0, 0])
  np.testing.assert_array_equal(_bn4.ghost_segments(3, None), [0, 0, 0])


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('batch', [4, 16])
def test_ghost_bn_of_the_whole_batch_is_batchnorm(batch, shape):
  x = _inputs((batch,) + shape, seed=3)
  scale, bias = _affine(shape[-1])
  y, stats = _apply_train(
      _bn4.BN4(use_running_average=False, ghost_batch_size=batch), x, scale,
      bias)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=_EPS)
  variables = bn.init(jax.random.key(0), x)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': variables['batch_stats']}
  y_bn, bn_state = bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_bn, **_TOL)
  np.testing.assert_allclose(stats['mean'], bn_state['batch_stats']['mean'],
                             **_TOL)
  np.testing.assert_allclose(stats['var'], bn_state['batch_stats']['var'],
                             **_TOL)


@pytest.mark.parametrize('combine', _bn4.COMBINES)
@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('batch,group_size', [(1, 4), (2, 4), (3, 2),
                                              (2, 8)])
def test_batch_group_norm_equals_numpy(batch, group_size, shape, combine):
  x = _inputs((batch,) + shape, seed=4)
  scale, bias = _affine(shape[-1])
  layer = _bn4.BN4(use_running_average=False, ghost_batch_size=None,
                   group_size=group_size, combine=combine)
  y, stats = _apply_train(layer, x, scale, bias)
  y_ref, mean_ref, var_ref = _np_train(x, None, group_size, combine)
  np.testing.assert_allclose(y, y_ref * scale + bias, **_TOL)
  np.testing.assert_allclose(stats['mean'], mean_ref, **_TOL)
  np.testing.assert_allclose(stats['var'], var_ref, **_TOL)
  assert np.all(np.isfinite(y))


def test_batch_group_norm_at_batch_one_is_group_norm():
  x = _inputs((1, 5, 5, 8), seed=5)
  scale, bias = _affine(8)
  y, _ = _apply_train(_bn4.BN4(use_running_average=False,
                               ghost_batch_size=None, group_size=4), x, scale,
                      bias)
  gn = nn.GroupNorm(num_groups=2, epsilon=_EPS)
  y_gn = gn.apply({'params': {'scale': scale, 'bias': bias}}, x)
  np.testing.assert_allclose(y, y_gn, **_TOL)


def _np_inference(x, mu_pop, var_pop, alpha, group_size):
  """The mixture of the example's and the population statistics, float64."""
  x = x.astype(np.float64)
  n, c = x.shape[0], x.shape[-1]
  groups = c // group_size
  xg = x.reshape(n, -1, groups, group_size)
  mu_x = xg.mean(axis=(1, 3))
  var_x = xg.var(axis=(1, 3))
  mu_p = mu_pop.reshape(groups, group_size)[:, 0].astype(np.float64)
  var_p = var_pop.reshape(groups, group_size)[:, 0].astype(np.float64)
  mu = alpha * mu_x + (1 - alpha) * mu_p
  var = (alpha * var_x + (1 - alpha) * var_p
         + alpha * (1 - alpha) * (mu_x - mu_p) ** 2)
  return _np_normalise(x, mu, var, group_size, _EPS)


@pytest.mark.parametrize('shape', _SHAPES)
@pytest.mark.parametrize('group_size', [1, 4])
@pytest.mark.parametrize('alpha', [0.0, 0.1, 0.5, 1.0])
def test_inference_example_weighing_equals_numpy(alpha, group_size, shape):
  x = _inputs((6,) + shape, seed=6)
  c = shape[-1]
  rng = np.random.default_rng(7)
  mu_pop = np.repeat(rng.normal(size=c // group_size) * 2, group_size)
  var_pop = np.repeat(rng.uniform(0.2, 4.0, c // group_size), group_size)
  scale, bias = _affine(c)
  layer = _bn4.BN4(use_running_average=True, group_size=group_size,
                   example_weight=alpha)
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': mu_pop.astype(np.float32),
                               'var': var_pop.astype(np.float32)}}
  y = np.asarray(jax.jit(layer.apply)(variables, x))
  y_ref = _np_inference(x, mu_pop, var_pop, alpha, group_size)
  np.testing.assert_allclose(y, y_ref * scale + bias, **_TOL)
  if alpha == 0.0 and group_size == 1:
    bn = nn.BatchNorm(use_running_average=True, epsilon=_EPS)
    np.testing.assert_allclose(y, bn.apply(variables, x), **_TOL)
  if len(shape) == 1 and group_size == 1 and alpha:
    # Dense: one value per feature, the example's variance is 0.
    mu = alpha * x + (1 - alpha) * mu_pop
    var = (1 - alpha) * var_pop + alpha * (1 - alpha) * (x - mu_pop) ** 2
    np.testing.assert_allclose(
        y, (x - mu) / np.sqrt(var + _EPS) * scale + bias, **_TOL)


def test_inference_does_not_depend_on_the_batch():
  # Example weighing uses each example's own statistics only.
  x = _inputs((6, 5, 5, 8), seed=8)
  layer = _bn4.BN4(use_running_average=True, example_weight=0.3)
  variables = layer.init(jax.random.key(0), x)
  whole = layer.apply(variables, x)
  one = jnp.concatenate([layer.apply(variables, x[i:i + 1])
                         for i in range(6)])
  np.testing.assert_allclose(whole, one, rtol=1e-6, atol=1e-6)


def test_settings_pick_group_norm_below_the_threshold():
  small = _bn4.BN4Settings.for_batch_size(2)
  assert small.group_norm and small.layer(True).group_size == 4
  assert small.layer(True).ghost_batch_size is None
  large = _bn4.BN4Settings.for_batch_size(128)
  assert not large.group_norm and large.layer(True).group_size == 1
  assert large.layer(True).ghost_batch_size == 16
  assert _bn4.BN4Settings.for_batch_size(128,
                                         group_norm_below=256).group_norm
  config = _config.RunConfig(model='cnn5', method='bn4', batch_size=8,
                             group_norm_below=4, ghost_batch_size=2)
  assert config.bn4_settings() == _bn4.BN4Settings(ghost_batch_size=2)


# --------------------------------------------------------- weight decay


def _bn4_params(config, shape=(8, 8, 1)):
  model = _train.make_model(config, 10)
  params = model.init(jax.random.key(0), jnp.zeros((1,) + shape))['params']
  # Non-zero everywhere (the offsets start at 0).
  return jax.tree.map(lambda p: p + 0.5, params)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_norm_weight_decay_only_on_bn4_scale_and_offset(optimizer):
  config = _config.RunConfig(model='fc', method='bn4', optimizer=optimizer,
                             norm_weight_decay=0.01)
  params = _bn4_params(config)
  mask = _bn4.norm_param_mask(params)
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_leaves_with_path(mask)}
  chosen = sorted(k for k, v in flat.items() if v)
  # Three hidden layers, each followed by a BN4 layer.
  assert chosen == sorted(f"['BN4_{i}']['{p}']" for i in range(3)
                          for p in ('bias', 'scale'))
  tx = _train.make_optimizer(config, 1.0, steps_per_epoch=10)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for (path, u), p, m in zip(jax.tree_util.tree_leaves_with_path(updates),
                             jax.tree.leaves(params), jax.tree.leaves(mask)):
    if not m:
      assert not np.any(np.asarray(u)), jax.tree_util.keystr(path)
    elif optimizer == 'sgd':
      # Coupled L2: the gradient gets wd * p, SGD at rate 1 steps -wd * p.
      np.testing.assert_allclose(u, -0.01 * p, rtol=1e-6)
    else:
      # Adam's first step is -lr * sign(g) (up to its epsilon).
      np.testing.assert_allclose(u, -np.sign(p), rtol=1e-4)


def test_no_norm_weight_decay_elsewhere():
  # Other methods: no bn4 parameters, no bn4 decay.
  config = _config.RunConfig(model='fc', method='bn')
  assert config.resolved_bn4() == {}
  params = _bn4_params(config)
  assert not any(jax.tree.leaves(_bn4.norm_param_mask(params)))
  # bn4 with norm_weight_decay 0: Adam on zero gradients moves nothing.
  config = _config.RunConfig(model='fc', method='bn4', norm_weight_decay=0.0)
  params = _bn4_params(config)
  tx = _train.make_optimizer(config, 1.0, steps_per_epoch=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params),
                         tx.init(params), params)
  assert not any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))


# ------------------------------------------------- the harness's bn4 method


def test_bn4_method_config():
  method = _methods.METHODS['bn4']
  assert (method.label, method.norm, method.optimizer) == (
      'BN w/ 4 Things', 'bn4', 'adam')
  for bs, lr in [(128, 5e-3), (2, 1e-4), (1, 1e-3)]:
    assert _methods.default_learning_rate('cnn5', 'cifar10', bs, 'bn4') == (
        lr, f'Table 3: cnn5, cifar10, batch size {bs}')
  for name in ('fig4-cnn-bs1', 'fig5-bs128', 'fig5-bs2'):
    assert 'bn4' in _suites.SUITES[name].methods
  for name in ('fig4-fc-bs1', 'fig4-fc-bs6', 'fig3-cifar10'):
    assert 'bn4' not in _suites.SUITES[name].methods
  config = _config.RunConfig(model='cnn5', dataset='cifar10', method='bn4',
                             batch_size=2)
  identity = _config.canonical(config)
  assert identity['optimizer'] == 'adam'
  assert identity['ghost_batch_size'] == _bn4.DEFAULT_GHOST_BATCH_SIZE
  assert identity['group_norm_below'] == _bn4.DEFAULT_GROUP_NORM_BELOW
  assert identity['example_weight'] == _bn4.DEFAULT_EXAMPLE_WEIGHT
  assert identity['norm_weight_decay'] == _bn4.DEFAULT_NORM_WEIGHT_DECAY
  # The defaults given explicitly are the same run; another value is not.
  assert _config.RunConfig(
      model='cnn5', dataset='cifar10', method='bn4', batch_size=2,
      optimizer='adam', example_weight=_bn4.DEFAULT_EXAMPLE_WEIGHT
  ).run_name() == config.run_name()
  assert _config.RunConfig(
      model='cnn5', dataset='cifar10', method='bn4', batch_size=2,
      example_weight=0.2).run_name() != config.run_name()
  # Other methods: the optimizer resolves to SGD and no bn4 field is stored.
  bn = _config.canonical(_config.RunConfig(method='bn'))
  assert bn['optimizer'] == 'sgd' and 'ghost_batch_size' not in bn
  with pytest.raises(ValueError, match='bn4 only'):
    _config.check(_config.RunConfig(method='bn', example_weight=0.2))
  with pytest.raises(ValueError, match='example-weight'):
    _config.check(_config.RunConfig(method='bn4', example_weight=1.5))


def _synthetic(n_train, n_test=64, size=18, classes=4, seed=0):
  """Small uint8 images (18 x 18: CNN5's smallest), class-coded by colour."""
  rng = np.random.default_rng(seed)

  def make(n):
    y = rng.integers(0, classes, n).astype(np.int32)
    x = rng.integers(0, 120, (n, size, size, 3)).astype(np.int32)
    for c in range(classes):
      rows = slice(0, size // 2) if c % 2 else slice(size // 2, size)
      x[y == c, rows, :, c % 3] += 120
    return x.astype(np.uint8), y

  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  return _data.Dataset('cifar10', x_train, y_train, x_test, y_test, classes,
                       'synthetic')


# Each compiles and trains a CNN (10-30 s on a loaded 2-core CPU): out of the
# default run, in `bash scripts/test.sh -m slow` (see README.md).
@pytest.mark.slow
@pytest.mark.parametrize('batch_size,n_train,epochs,evals', [
    (1, 64, 1, 2), (2, 128, 1, 2), (128, 256, 3, 1)])
def test_bn4_run_trains(batch_size, n_train, epochs, evals):
  # The paper's rates (Table 3) and Adam; Batch + Group Norm at batch sizes
  # 1 and 2, Ghost BN (ghost batches of 16) at 128.
  config = _config.RunConfig(model='cnn5', dataset='cifar10', method='bn4',
                             batch_size=batch_size, epochs=epochs,
                             evals_per_epoch=evals)
  _config.check(config)
  assert config.bn4_settings().group_norm == (batch_size < 16)
  result = _train.train(config, _synthetic(n_train), progress=False,
                        log=None)
  _results.check_result(result)
  stored = result['config']
  assert stored['optimizer'] == 'adam' and stored['method'] == 'bn4'
  assert stored['norm_weight_decay'] == _bn4.DEFAULT_NORM_WEIGHT_DECAY
  assert stored['learning_rate_source'].startswith('Table 3')
  assert not result['final']['diverged']
  # The training loss decreases, below chance (log 4). (The test loss lags
  # in so few steps: the running statistics, momentum 0.99, are still
  # mostly their initial values.)
  losses = [h['train_loss'] for h in result['history'][1:]]
  assert losses[-1] < losses[0] and losses[-1] < np.log(4), losses
  assert np.isfinite(result['history'][-1]['test_loss'])


def test_bn4_at_batch_one_is_finite():
  # The Batch + Group Norm path: at batch size 1 BatchNorm alone would give
  # a constant output on the Dense layer.
  config = _config.RunConfig(model='cnn5', dataset='cifar10', method='bn4',
                             batch_size=1, learning_rate=1e-3)
  assert config.bn4_settings().group_norm
  trainer = _train.Trainer(config, 10, (18, 18, 3), steps_per_epoch=4)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (1, 18, 18, 3)).astype(np.uint8)
  y = np.array([3], np.int32)
  step = jax.jit(trainer.step)
  state, loss = step(trainer.state, x, y)
  state, loss2 = step(state, x, y)
  assert np.isfinite(float(loss)) and float(loss2) < float(loss)
  logits = trainer.model.apply({'params': state[0], **state[1]},
                               x.astype(np.float32) / 255, train=True,
                               mutable=['batch_stats'])[0]
  assert np.all(np.isfinite(logits))
  # The Dense layer's output depends on the input at batch size 1.
  other = trainer.model.apply({'params': state[0], **state[1]},
                              x[:, ::-1].astype(np.float32) / 255,
                              train=True, mutable=['batch_stats'])[0]
  assert not np.allclose(logits, other)
  inference = trainer.model.apply({'params': state[0], **state[1]},
                                  x.astype(np.float32) / 255, train=False)
  assert np.all(np.isfinite(inference))


def test_legend_ignores_the_methods_own_defaults():
  # bn4's Adam and its fields are the method's defaults: in a panel of bn
  # and bn4 only the learning rate (Table 3's, per method) differs.
  def run(method, **kwargs):
    config = _config.RunConfig(model='cnn5', dataset='cifar10',
                               batch_size=2, method=method, **kwargs)
    return {'config': _config.canonical(config)}

  groups = {'a': [run('bn')], 'b': [run('bn4')]}
  assert _plot._differing(groups) == ['learning_rate']
  groups['c'] = [run('bn4', example_weight=0.3)]
  assert _plot._differing(groups) == ['learning_rate', 'example_weight']
  groups = {'a': [run('bn', optimizer='adam')], 'b': [run('bn4')]}
  assert _plot._differing(groups) == ['learning_rate', 'optimizer']
