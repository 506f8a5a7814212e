"""The ViT of bnp_optax.experiments, with and without BNP.

Its three normalisations, BNP's coverage of every projection, one step of
each Transformer method, and a tiny suite with a learning-rate grid through
the command line.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnp_optax
from bnp_optax.experiments import _cli
from bnp_optax.experiments import _models
from bnp_optax.experiments import _train
from bnp_optax.experiments import _vit

_SHAPE = (8, 8, 3)  # 4 patches of 4x4
_METHODS = ('vanilla', 'bnp', 'adamw', 'bnp_adamw')
_VIT_NORMS = {'vit': 'ln', 'vit_dyt': 'dyt', 'vit_nonorm': 'none'}


class _TinyViT(_vit.ViT):
  """The harness's ViT, narrower and shallower: it compiles in a second."""

  dim: int = 16
  depth: int = 2
  num_heads: int = 2
  mlp_dim: int = 32


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
  monkeypatch.setattr(_vit, 'ViT', _TinyViT)


# Every method on the LayerNorm ViT, BNP on the other two (a ViT compiles
# for seconds: the suite stays short).
@pytest.mark.parametrize('model,method', [
    *(('vit', m) for m in _METHODS), ('vit_dyt', 'bnp_adamw'),
    ('vit_nonorm', 'bnp')])
def test_vit_and_method_takes_a_step(model, method):
  config = _train.RunConfig(model=model, method=method, dataset='cifar10',
                            batch_size=4, learning_rate=1e-3,
                            weight_decay=0.05)
  trainer = _train.Trainer(config, 10, _SHAPE, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4,) + _SHAPE).astype(np.uint8)
  y = rng.integers(0, 10, 4).astype(np.int32)
  step = jax.jit(trainer.step)
  state, loss = step(trainer.state, x, y)
  state, loss = step(state, x, y)  # the zero-initialised head has moved
  assert np.isfinite(float(loss))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state[0],
                       trainer.state[0])
  assert all(jax.tree.leaves(moved['block_0'])), moved['block_0']
  norm = _VIT_NORMS[model]
  names = set(state[0]['block_0'])
  assert {'LayerNorm_0', 'LayerNorm_1'} <= names if norm == 'ln' else (
      'LayerNorm_0' not in names)
  assert ({'DyT_0', 'DyT_1'} <= names) == (norm == 'dyt')


def test_vit_norm_must_come_from_the_model():
  with pytest.raises(ValueError, match='has its own normalisation'):
    _models.make_model('vit', 'ln', 10)


@pytest.mark.parametrize('model', list(_VIT_NORMS))
def test_bnp_covers_every_projection_of_the_vit(model):
  vit = _models.make_model(model, 'none', 10)
  x = jnp.ones((2,) + _SHAPE)
  variables = vit.init(jax.random.key(0), x)
  _, stats = bnp_optax.linen.apply(vit, variables, x)
  specs = bnp_optax.linen.layer_specs(vit, variables, x)
  roles = bnp_optax.describe_coverage(variables['params'], stats,
                                      layer_specs=specs)
  kernels = {k.removesuffix('/kernel') for k, v in roles.items()
             if v == 'dense kernel'}
  attention = {f'block_{i}/MultiHeadDotProductAttention_0/{p}'
               for i in range(2) for p in ('query', 'key', 'value', 'out')}
  mlp = {f'block_{i}/Dense_{j}' for i in range(2) for j in (0, 1)}
  assert kernels == {'patch_embedding', 'head'} | attention | mlp
  assert all(roles[f'{k}/bias'] == 'dense bias' for k in kernels)
  passed = {k for k, v in roles.items() if v.startswith('pass-through')}
  # The position embedding and the normalisation parameters only.
  assert 'position_embedding' in passed
  assert all(k == 'position_embedding' or 'LayerNorm' in k or 'DyT' in k
             for k in passed), passed
  # The output projection contracts (heads, head_dim): one fan-in of 16.
  flat = {}

  def visit(path, node):
    if isinstance(node, bnp_optax.LayerStats):
      flat['/'.join(path)] = node
    elif isinstance(node, bnp_optax.NotPreconditioned):
      return  # a parameter the capture names and passes through
    else:
      for k, v in node.items():
        visit(path + (k,), v)

  visit((), stats)
  out = flat['block_0/MultiHeadDotProductAttention_0/out']
  assert out.mean.shape == (2, 8)
  assert float(out.count) == 2 * 4  # batch x tokens


def test_dyt_is_scaled_tanh():
  x = jnp.linspace(-3.0, 3.0, 12).reshape(3, 4)
  layer = _vit.DyT(alpha_init=0.7)
  params = {'params': {'alpha': jnp.asarray(0.7),
                       'scale': jnp.asarray([1.0, 2.0, 0.5, -1.0]),
                       'bias': jnp.asarray([0.0, 0.1, -0.2, 0.3])}}
  assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x)) == (
      jax.tree.map(jnp.shape, params))
  expected = (np.tanh(0.7 * np.asarray(x)) * [1.0, 2.0, 0.5, -1.0]
              + [0.0, 0.1, -0.2, 0.3])
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-6)


def test_vit_suite_with_a_learning_rate_grid(tmp_path, capsys):
  """A few steps of the CPU smoke version of the GPU comparison."""
  rng = np.random.default_rng(0)
  for split, n in (('train', 180), ('test', 20)):
    np.savez(tmp_path / f'cifar10_{split}.npz',
             x=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
             y=rng.integers(0, 10, n).astype(np.uint8))
  out = tmp_path / 'runs'
  status = _cli.main([
      'suite', 'vit-ln', '--methods', 'adamw,bnp_adamw', '--epochs', '1',
      '--lr-grid', 'adamw:0.001', '--lr-grid', 'bnp_adamw:0.001,0.003',
      '--validation-split', '0.25', '--data-dir', str(tmp_path),
      '--out', str(out), '--no-progress'])
  captured = capsys.readouterr().out
  assert status == 0, captured
  runs = [json.loads(p.read_text())
          for p in (out / 'vit-ln').glob('vit-*.json')]
  assert sorted((r['config']['method'], r['config']['learning_rate'])
                for r in runs) == [('adamw', 0.001), ('bnp_adamw', 0.001),
                                   ('bnp_adamw', 0.003)]
  assert all(r['config']['model'] == 'vit' for r in runs)
  assert list(out.glob('**/sweep-*.json')), captured
