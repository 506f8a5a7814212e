"""Every model/method combination of bnp_optax.experiments takes a step."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnp_optax.experiments import _batch_renorm
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _normfree
from bnp_optax.experiments import _train

# Compiles a deep ResNet for minutes on CPU: out of the default run, run by
# `bash scripts/test.sh -m slow` (see README.md).
_SLOW = pytest.mark.slow


def _one_step(model, method, shape, *, batch_size=2, classes=10, **kwargs):
  config = _train.RunConfig(model=model, method=method, dataset='cifar10',
                            batch_size=batch_size, learning_rate=0.01,
                            **kwargs)
  trainer = _train.Trainer(config, classes, shape, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (batch_size,) + shape).astype(np.uint8)
  y = rng.integers(0, classes, batch_size).astype(np.int32)
  state, loss = jax.jit(trainer.step)(trainer.state, x, y)
  assert np.isfinite(float(loss))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state[0],
                         trainer.state[0])
  assert any(jax.tree.leaves(changed)), 'no parameter moved'
  correct, _ = jax.jit(trainer.evaluate)(state, x, y,
                                         np.ones(batch_size, np.float32))
  assert 0 <= float(correct) <= batch_size
  return trainer, state


@pytest.mark.parametrize('method', list(_methods.METHODS))
@pytest.mark.parametrize('model,shape', [('fc', (28, 28, 1)),
                                         ('cnn5', (18, 18, 3))])
def test_paper_models_every_method(model, shape, method):
  entry = _methods.METHODS[method]
  if entry.optimizer == 'kfac':  # refused, saying why (docs/comparison.md)
    with pytest.raises(ValueError, match='K-FAC.*kfac-jax'):
      _one_step(model, method, shape)
    return
  if entry.arch and model not in _normfree.MODELS:
    with pytest.raises(ValueError, match=f'{entry.arch} is built for'):
      _one_step(model, method, shape)
    return
  trainer, state = _one_step(model, method, shape)
  norm = _methods.METHODS[method].norm
  if norm in ('bn', 'renorm', 'bn4'):
    assert 'batch_stats' in state[1]
  else:
    assert not state[1]
  if method == 'bnp':
    # The BNP network is the vanilla network: no normalisation parameters.
    assert all(k.startswith(('Dense', 'Conv')) for k in state[0])


@pytest.mark.parametrize('method', ['bn', 'gn', 'bnp', 'bnp_gn'])
@pytest.mark.parametrize('model', ['resnet110', 'preact_resnet110'])
def test_cifar_resnets_small_depth(model, method):
  # One block per stage (ResNet-8) has every kind of block of ResNet-110.
  _one_step(model, method, (8, 8, 3), resnet_blocks=1, augment=True,
            optimizer='momentum', weight_decay=1e-4, warmup_steps=4,
            lr_decay_epochs=(1,))


def test_resnet18_builds():
  # Its step (a minute of compilation on CPU) is in test_full_resnets.
  config = _train.RunConfig(model='resnet18', method='bnp_gn',
                            dataset='cifar10')
  model = _train.make_model(config, 10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes)) > 11e6


@_SLOW
@pytest.mark.parametrize('method', ['bn', 'gn', 'bnp', 'bnp_gn'])
@pytest.mark.parametrize('model', ['resnet110', 'preact_resnet110',
                                   'resnet18'])
def test_full_resnets(model, method):
  trainer, _ = _one_step(model, method, (8, 8, 3))
  if model.endswith('110'):
    assert trainer.num_params > 1_700_000


def test_resnet110_depth():
  # 1 stem conv + 54 blocks x 2 convs + 2 projections + 1 dense = 110
  # weighted layers, with projection shortcuts (not counted by He et al.).
  config = _train.RunConfig(model='resnet110', method='bn',
                            dataset='cifar10')
  model = _train.make_model(config, 10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(
      shapes['params']) if 'kernel' in jax.tree_util.keystr(path)]
  assert len(kernels) == 110 + 2


def test_batch_renorm_schedule_and_modes():
  r, d = _batch_renorm.renorm_clip_bounds(0)
  assert (float(r), float(d)) == (1.0, 0.0)
  r, d = _batch_renorm.renorm_clip_bounds(5000 + 20000)
  np.testing.assert_allclose([float(r), float(d)], [2.0, 4.0])
  r, d = _batch_renorm.renorm_clip_bounds(10**6)
  assert (float(r), float(d)) == (3.0, 5.0)

  layer = _batch_renorm.BatchRenorm(epsilon=0.0)
  x = jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  assert int(variables['batch_stats']['steps']) == 0
  # r_max = 1 and d_max = 0 at the start: exactly BatchNorm.
  y, updated = layer.apply(variables, x, use_running_average=False,
                           mutable=['batch_stats'])
  expected = (x - x.mean(0)[None, :]) / x.std(0)[None, :]
  np.testing.assert_allclose(y, expected, rtol=1e-5)
  stats = updated['batch_stats']
  assert int(stats['steps']) == 1
  np.testing.assert_allclose(stats['mean'], 0.01 * x.mean(0), rtol=1e-5)
  # Late in training r and d correct towards the running statistics.
  late = {'params': variables['params'],
          'batch_stats': {'mean': jnp.array([2.0, 4.0]),
                          'var': jnp.array([4.0, 16.0]),
                          'steps': jnp.array(10**6, jnp.int32)}}
  y, _ = layer.apply(late, x, use_running_average=False,
                     mutable=['batch_stats'])
  sigma_b = x.std(0)
  r = sigma_b / jnp.array([2.0, 4.0])
  d = (x.mean(0) - jnp.array([2.0, 4.0])) / jnp.array([2.0, 4.0])
  np.testing.assert_allclose(
      y, (x - x.mean(0)[None, :]) / sigma_b[None, :] * r[None, :]
      + d[None, :], rtol=1e-5)
  # Inference uses the running statistics: (x - mu) / sigma.
  y = layer.apply(late, x, use_running_average=True)
  np.testing.assert_allclose(
      y, (x - jnp.array([[2.0, 4.0]])) / jnp.array([[2.0, 4.0]]), rtol=1e-5)


def test_default_learning_rates_follow_the_tables():
  lr = _methods.default_learning_rate
  assert lr('fc', 'cifar10', 6, 'renorm')[0] == 5e-2
  assert lr('cnn5', 'cifar10', 2, 'bnp') == (1e-2, 'Table 3: cnn5, cifar10, '
                                             'batch size 2')
  # MNIST's own rate (batch 60) at batch 1, not CIFAR-10's batch-1 rate.
  assert lr('fc', 'mnist', 1, 'bnp') == (
      5e-1, 'Table 2: fc, mnist, batch size 60 (nearest batch size)')
  value, source = lr('fc', 'mnist', 60, 'gn')
  assert value == 5e-1 and 'BN rate' in source
  assert lr('fc', 'mnist', 60, 'bnp_gn')[1].startswith('default')


@pytest.mark.parametrize('method', ['vanilla', 'bn', 'renorm', 'ln', 'bnp'])
def test_learning_rates_are_never_borrowed_across_datasets_silently(method):
  """MNIST at batch 1 ran vanilla at CIFAR-10's 0.0005 (issue 25)."""
  lr = _methods.default_learning_rate
  rate, source = lr('fc', 'mnist', 1, method)
  assert 'Table 2: fc, mnist, batch size 60' in source, source
  expected = _methods.LEARNING_RATES['fc', 'mnist', 60]
  assert rate == expected.get(method, expected['bn'])
  # digits takes MNIST's rates and says so.
  assert lr('fc', 'digits', 1, method) == (
      rate, source + ' (mnist rate, for digits)')
  # A dataset without any entry for the model borrows loudly.
  rate, source = lr('cnn5', 'mnist', 1, method)
  assert 'borrowed from cifar10' in source and '--lr' in source, source
