"""The comparison with today's methods: methods, budget, page (issue 22)."""

import importlib.util
import json
import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax.experiments import _cli
from bnp_optax.experiments import _cost
from bnp_optax.experiments import _modern
from bnp_optax.experiments import _normfree
from bnp_optax.experiments import _suites

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / 'docs' / 'comparison.md'
_TINY = ['--train-subset', '120', '--test-subset', '40', '--no-progress',
         '--checkpoint', 'never']


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  """A tiny random CIFAR-10 in the harness's npz format."""
  d = tmp_path_factory.mktemp('cifar10')
  rng = np.random.default_rng(0)
  for split, n in (('train', 150), ('test', 40)):
    np.savez(d / f'cifar10_{split}.npz',
             x=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
             y=rng.integers(0, 10, n).astype(np.uint8))
  return d


def _results(out):
  return [json.loads(f.read_text()) for f in sorted(out.glob('*.json'))
          if not f.name.startswith('sweep-')]


def test_optimizer_methods_train_within_a_budget(tmp_path):
  methods = ('adamw', 'bnp_adamw', 'centring_adamw', 'muon')
  status = _cli.main(['run', '--methods', ','.join(methods), '--batch-size',
                      '10', '--budget', '24', '--budget-evals', '3', '--lr',
                      '0.003', '--out', str(tmp_path)] + _TINY)
  assert status == 0
  results = {r['config']['method']: r for r in _results(tmp_path)}
  assert set(results) == set(methods)
  for method, result in results.items():
    cost = result['cost']
    assert cost['ratio'] > 0 and cost['rounds'] >= 7
    assert cost['budget_steps'] == _cost.budget_steps(24, cost['ratio'])
    assert result['timing']['steps'] == cost['budget_steps']
    # Evaluations: 3 equally spaced in the budget, and at each epoch's end
    # (12 steps of 10 from 120 examples).
    total = cost['budget_steps']
    assert [p['step'] for p in result['history']] == sorted(
        {round(total * k / 3) for k in range(4)} | set(range(0, total, 12)))
    assert result['config']['optimizer'] == (
        'muon' if method == 'muon' else 'adamw')
    assert cost['memory']['peak_bytes'] > 0
    assert all(math.isfinite(p['train_loss'])
               for p in result['history'][1:])


def test_small_batch_normalisers_train_the_cnn(cifar_dir, tmp_path):
  status = _cli.main(['run', '--model', 'cnn5', '--dataset', 'cifar10',
                      '--methods', 'gn_ws,nf_agc', '--batch-size', '4',
                      '--epochs',
                      '1', '--steps-per-call', '5', '--lr', '0.01',
                      '--data-dir', str(cifar_dir), '--out', str(tmp_path)]
                     + _TINY)
  assert status == 0
  results = _results(tmp_path)
  assert {r['config']['method'] for r in results} == {'gn_ws', 'nf_agc'}
  for result in results:
    assert all(math.isfinite(p['train_loss'])
               for p in result['history'][1:])


def test_vanilla_sgd_is_its_own_reference(tmp_path):
  status = _cli.main(['run', '--methods', 'vanilla', '--batch-size', '10',
                      '--budget', '12', '--lr', '0.01', '--out',
                      str(tmp_path)] + _TINY)
  assert status == 0
  (result,) = _results(tmp_path)
  assert result['cost']['ratio'] == 1.0
  assert result['cost']['budget_steps'] == 12
  assert 'ratio_measured' in result['cost']


def test_kfac_names_why_it_cannot_run(tmp_path, capsys):
  why = _modern.kfac_available()
  status = _cli.main(['run', '--methods', 'kfac', '--out', str(tmp_path)]
                     + _TINY)
  err = capsys.readouterr().err
  if why is None:
    pytest.skip('kfac-jax imports here')
  assert status == 2 and 'K-FAC' in err and 'kfac-jax' in err
  assert not list(tmp_path.glob('*.json'))


def test_normfree_methods_refuse_the_fc_network(tmp_path, capsys):
  assert _cli.main(['run', '--methods', 'gn_ws', '--out', str(tmp_path)]
                   + _TINY) == 2
  assert 'gn_ws' in capsys.readouterr().err


def test_budget_evals_needs_a_budget(tmp_path, capsys):
  assert _cli.main(['run', '--methods', 'adamw', '--budget-evals', '4',
                    '--out', str(tmp_path)] + _TINY) == 2
  assert '--budget-evals needs --budget' in capsys.readouterr().err


def _dense_oracle(x, g_w, g_b):
  """Centring alone, float64: G_w - mu G_b, then G_b - sum mu G_w'."""
  mu = x.mean(0)
  new_w = g_w - mu[:, None] * g_b[None]
  return new_w, g_b - mu @ new_w


def test_centring_only_matches_the_float64_oracle():
  model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (8, 4)) * 2 + 1
  params = model.init(jax.random.key(1), x)['params']

  def loss(p):
    out, stats = bnp_optax.linen.apply(model, {'params': p}, x)
    return jnp.sum(out[:, 0] ** 2), stats

  grads, stats = jax.grad(loss, has_aux=True)(params)
  tx = _modern.scale_by_bnp_centring(rho=0.0)  # mu: this batch's mean.
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      layer_stats=stats)
  want_w, want_b = _dense_oracle(
      np.asarray(x, np.float64),
      np.asarray(grads['layers_0']['kernel'], np.float64),
      np.asarray(grads['layers_0']['bias'], np.float64))
  np.testing.assert_allclose(updates['layers_0']['kernel'], want_w,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates['layers_0']['bias'], want_b,
                             rtol=1e-5, atol=1e-6)
  assert int(state.count) == 1


def test_adam_cancels_bnp_row_scaling_but_not_centring():
  """A constant per-row scaling is invisible to Adam; the centring is not.

  The mechanism of docs/comparison.md's BNP + Adam section.
  """
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
           for _ in range(5)]
  scale = jnp.asarray([[1.0], [10.0], [0.1], [3.0]])  # 1/(sigma~^2 q^2).
  tx = optax.adam(0.1, eps=0.0)

  def steps(gs):
    state, out = tx.init(gs[0]), None
    for g in gs:
      out, state = tx.update(g, state)
    return np.asarray(out)

  np.testing.assert_allclose(steps(grads), steps([g * scale for g in grads]),
                             rtol=1e-5)
  centred = [g - 0.5 * g[:1] for g in grads]  # G_w - mu G_b-like mixing.
  assert not np.allclose(steps(grads), steps(centred), rtol=1e-2)


def test_muon_sees_conv_kernels_as_matrices():
  model = _normfree.make_model('resnet110', 'nf', 10, resnet_blocks=1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  dims = _modern.muon_dimension_numbers(params)
  conv = dims['_NFBlock_1']['WSConv_1']['kernel']
  assert conv.reduction_axis == (0, 1, 2) and conv.output_axis == 3
  assert dims['head']['kernel'] is None  # The classifier: AdamW.
  assert dims['_NFBlock_1']['WSConv_1']['gain'] is None


def test_ws_conv_standardises_its_kernel():
  layer = _normfree.WSConv(3, (1, 1), use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 5))
  params = layer.init(jax.random.key(1), x)
  kernel = np.asarray(params['params']['kernel'], np.float64)[0, 0]
  w = (kernel - kernel.mean(0)) / np.sqrt(kernel.var(0) + 1e-5)
  want = np.asarray(x, np.float64) @ w
  np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-4,
                             atol=1e-5)


def test_agc_leaves_the_classifier_alone():
  params = {'Dense_0': {'kernel': jnp.ones((3, 2))},
            'Dense_1': {'kernel': jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: 1e3 * p, params)
  tx = _modern.agc(0.01)
  clipped, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.max(clipped['Dense_0']['kernel'])) < 1.0
  np.testing.assert_array_equal(clipped['Dense_1']['kernel'],
                                grads['Dense_1']['kernel'])


def test_comparison_suites_run_each_method_with_its_own_optimizer():
  build = _load('comparison_build', ROOT / 'docs' / 'comparison' / 'build.py')
  run = _load('comparison_run', ROOT / 'docs' / 'comparison' / 'run.py')
  for w in build.WORKLOADS:
    suite = _suites.SUITES[w.suite]
    assert suite.settings['budget'] >= 1
    for m in suite.methods:
      assert len(run.grid(w.suite, m, 5)) == 5
      assert run.grid(w.suite, m, 3) == run.grid(w.suite, m, 5)[1:4]
      if m in ('adamw', 'bnp_adamw', 'centring_adamw', 'muon'):
        assert suite.method_settings[m]['optimizer'] in ('adamw', 'muon')


def test_page_matches_the_committed_runs():
  build = _load('comparison_build', ROOT / 'docs' / 'comparison' / 'build.py')
  page = PAGE.read_text()
  assert build.render(page, build.blocks()) == page, (
      'docs/comparison.md differs from its committed runs: run '
      'python docs/comparison/build.py')
  assert not re.search(r'VERDICT_|MECHANISM|RULE\n|TODO|TBD', page)


# One of each kind runs by default; all of them with -m slow.
_GPU_QUICK = (('cmp-resnet20-bs8', 'nf_agc'), ('cmp-resnet20-bs8', 'bnp_gn'),
              ('cmp-cnn-bs2', 'muon'))


def _gpu_pairs():
  build = _load('comparison_build', ROOT / 'docs' / 'comparison' / 'build.py')
  return [pytest.param(w.suite, m, marks=() if (w.suite, m) in _GPU_QUICK
                       else pytest.mark.slow)
          for w in build.WORKLOADS if 'GPU' in w.missing
          for m in _suites.SUITES[w.suite].methods]


@pytest.mark.parametrize('suite,method', _gpu_pairs())
def test_gpu_workloads_build_and_trace_a_step(suite, method):
  """Each GPU (workload, method) builds and traces its step (no compile).

  The GPU job cannot be tried here at full size (a ResNet-20 compile takes
  minutes on this CPU): this checks its configuration, model and optimizer
  on ResNet-8 (one block per stage), the rest as the suite says.
  """
  from bnp_optax.experiments import _config  # pylint: disable=g-import-not-at-top
  from bnp_optax.experiments import _train  # pylint: disable=g-import-not-at-top
  s = _suites.SUITES[suite]
  settings = dict(s.settings, **s.method_settings.get(method, {}))
  if 'resnet_blocks' in settings:
    settings['resnet_blocks'] = 1
  config = _config.RunConfig(model=s.model, dataset=s.dataset,
                             batch_size=s.batch_size, method=method,
                             learning_rate=0.01, **settings)
  _config.check(config)
  trainer = _train.Trainer(config, 10, (32, 32, 3), 100)
  x = jax.ShapeDtypeStruct((s.batch_size, 32, 32, 3), jnp.uint8)
  y = jax.ShapeDtypeStruct((s.batch_size,), jnp.int32)
  state, loss = jax.eval_shape(trainer.step, trainer.state, x, y)
  assert loss.shape == () and jax.tree.structure(state) == jax.tree.structure(
      trainer.state)
