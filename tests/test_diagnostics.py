"""bnp_optax.diagnostics against jax.hessian and the paper's algebra."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax import diagnostics
import bnp_optax.linen  # registers the lazy submodule
from tests import models


class TanhMLP(nn.Module):
  """5 -> 6 -> 4 -> 3 with tanh (non-zero second derivatives everywhere)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(6, name='Dense_0')(x))
    x = jnp.tanh(nn.Dense(4, name='Dense_1')(x))
    return nn.Dense(3, name='Dense_2')(x)


def _cross_entropy(y):
  def loss(logits):
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, y))

  return loss


def _problem(model, x_shape, n_classes=3, seed=0):
  kx, kp = jax.random.split(jax.random.key(seed))
  x = 2.0 * jax.random.normal(kx, x_shape, jnp.float64) + 1.0
  y = jnp.arange(x_shape[0]) % n_classes
  variables = model.init(kp, x)
  variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
  return variables, x, _cross_entropy(y)


@pytest.mark.parametrize(
    'batch,layer,neuron',
    [(1, 'Dense_0', 0), (2, 'Dense_1', 2), (7, 'Dense_2', 1),
     (7, 'Dense_0', 5)],
)
def test_dense_hessian_matches_jax_hessian(batch, layer, neuron):
  with jax.enable_x64(True):
    model = TanhMLP()
    variables, x, loss = _problem(model, (batch, 5))
    got = diagnostics.neuron_hessian(
        model, variables, x, loss, layer=layer, neuron=neuron
    )
    want = diagnostics.neuron_hessian_autodiff(
        model, variables, x, loss, layer=layer, neuron=neuron
    )
  np.testing.assert_allclose(got.hessian, want, rtol=1e-10, atol=1e-12)
  # Proposition 2: S is diagonal for a Dense neuron and a mean loss.
  s = got.curvature
  np.testing.assert_array_equal(s, np.diag(np.diag(s)))


def test_output_layer_curvature_is_softmax_variance():
  """S = diag(p_i (1 - p_i)) / N for softmax cross-entropy, output layer."""
  with jax.enable_x64(True):
    model = TanhMLP()
    variables, x, loss = _problem(model, (9, 5))
    nh = diagnostics.neuron_hessian(
        model, variables, x, loss, layer='Dense_2', neuron=1
    )
    p = jax.nn.softmax(model.apply(variables, x))[:, 1]
    want = np.diag(np.asarray(p * (1 - p))) / 9
  np.testing.assert_allclose(nh.curvature, want, rtol=1e-12, atol=1e-15)


def test_dense_inputs_are_the_layer_inputs():
  with jax.enable_x64(True):
    model = models.MLP()
    variables, x, loss = _problem(model, (7, 6))
    nh = diagnostics.neuron_hessian(
        model, variables, x, loss, layer='Dense_2', neuron=0
    )
    inputs, _ = models.mlp_layer_inputs(variables['params'], x)
  np.testing.assert_allclose(nh.inputs, inputs['Dense_2'], rtol=1e-12)


@pytest.mark.parametrize('layer,batch', [('Conv_0', 1), ('Conv_1', 3)])
def test_conv_hessian_matches_jax_hessian(layer, batch):
  with jax.enable_x64(True):
    model = models.CNN()
    variables, x, loss = _problem(model, (batch, 6, 6, 2))
    got = diagnostics.neuron_hessian(
        model, variables, x, loss, layer=layer, neuron=1
    )
    want = diagnostics.neuron_hessian_autodiff(
        model, variables, x, loss, layer=layer, neuron=1
    )
  np.testing.assert_allclose(got.hessian, want, rtol=1e-10, atol=1e-12)
  positions = 36 if layer == 'Conv_0' else 4
  channels = 2 if layer == 'Conv_0' else 3
  assert got.inputs.shape == (batch * positions, 9 * channels)
  # Proposition 9: S is block diagonal, one r*s block per example.
  s = got.curvature.reshape(batch, positions, batch, positions)
  for i in range(batch):
    for j in range(batch):
      if i != j:
        np.testing.assert_array_equal(s[i, :, j, :], 0.0)


def _exact_patch_statistics(x, k):
  """Eqs. 19-20 by their definition: zero-padded sub-maps, SAME, stride 1."""
  n, r, s, c = x.shape
  pad = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  mean = np.zeros((k, k, c))
  var = np.zeros((k, k, c))
  for t in range(k):
    for a in range(k):
      sub = xp[:, t : t + r, a : a + s, :].reshape(-1, c)
      mean[t, a] = sub.mean(axis=0)
      var[t, a] = np.square(sub - mean[t, a]).mean(axis=0)
  return mean.reshape(-1), var.reshape(-1)


def test_conv_patch_statistics_are_eqs_19_20_and_prop_10_holds():
  with jax.enable_x64(True):
    model = models.CNN()
    variables, x, loss = _problem(model, (3, 6, 6, 2))
    nh = diagnostics.neuron_hessian(
        model, variables, x, loss, layer='Conv_0', neuron=0
    )
  x = np.asarray(x)
  exact = diagnostics.patch_statistics(nh.inputs)
  mean, var = _exact_patch_statistics(x, 3)
  np.testing.assert_allclose(exact.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(exact.variance, var, rtol=1e-12)
  channel_mean = x.reshape(-1, 2).mean(axis=0)  # Eq. 21
  for p in range(2):
    error = np.abs(exact.mean.reshape(3, 3, 2)[..., p] - channel_mean[p])
    bound = diagnostics.conv_mean_error_bound(3, 6, 6, np.abs(x[..., p]).max())
    assert error.max() <= bound + 1e-12
    assert error.max() > 0  # the approximation is not exact at this size


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
def test_preconditioner_is_the_optimizers(model_name):
  """(1/q^2) P P^T [g_b; g_w] is what scale_by_bnp returns, per neuron."""
  with jax.enable_x64(True):
    if model_name == 'mlp':
      model, shape, layer, q2 = models.MLP(), (4, 6), 'Dense_2', 1.0
    else:
      # Conv_0: n_in = 9 * 2 = 18, N = 4, r s = 36: q^2 = max(4.5, 6).
      model, shape, layer, q2 = models.CNN(), (4, 6, 6, 2), 'Conv_0', 6.0
    variables, x, loss = _problem(model, shape)
    tx = bnp_optax.scale_by_bnp(rho=0.5)
    state = tx.init(variables['params'])

    def loss_fn(params):
      out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      return loss(out), stats

    grads, stats = jax.grad(loss_fn, has_aux=True)(variables['params'])
    for _ in range(2):
      updates, state = tx.update(grads, state, layer_stats=stats)
    running = state.running_stats[layer]
  g = grads[layer]
  u = updates[layer]
  for neuron in range(g['bias'].shape[0]):
    g_hat = np.concatenate(
        [[g['bias'][neuron]], g['kernel'][..., neuron].ravel()])
    u_hat = np.concatenate(
        [[u['bias'][neuron]], u['kernel'][..., neuron].ravel()])
    p = diagnostics.preconditioner(running, size=g_hat.size - 1)
    np.testing.assert_allclose(u_hat, p @ p.T @ g_hat / q2, rtol=1e-10,
                               atol=1e-14)


def test_theorem_3_and_4():
  """P^T H^T S H P = G^T S G with normalised inputs; conditioning improves."""
  rng = np.random.default_rng(0)
  n, m = 4, 40
  h = rng.normal(size=(m, n)) * np.array([1e-2, 1.0, 10.0, 1e2]) + 3.0
  s = rng.uniform(0.1, 1.0, size=m) / m
  hess = diagnostics.hessian_from_inputs(h, s)
  stats = diagnostics.patch_statistics(h)
  p = diagnostics.preconditioner(stats, eps1=0.0, eps2=0.0)
  g = (h - stats.mean) / np.sqrt(stats.variance)
  np.testing.assert_allclose(
      p.T @ hess @ p, diagnostics.hessian_from_inputs(g, s), rtol=1e-9,
      atol=1e-12,
  )
  c = diagnostics.conditioning(hess, stats, eps1=0.0, eps2=0.0)
  assert c.rank == n + 1
  # kappa(D) = 1e2 / 1e-2 = 1e4 up to sampling; improvement ~ kappa(D)^2.
  assert 1e3 < c.kappa_d < 1e5
  assert c.kappa_preconditioned < 10
  assert c.improvement > 1e-2 * c.kappa_d**2
  np.testing.assert_allclose(c.improvement,
                             c.kappa_hessian / c.kappa_preconditioned)


def test_condition_number_ignores_zero_singular_values():
  h = np.random.default_rng(1).normal(size=(3, 6))  # rank 3 < 7
  hess = diagnostics.hessian_from_inputs(h, np.ones(3))
  assert np.isfinite(diagnostics.condition_number(hess))
  c = diagnostics.conditioning(hess, diagnostics.patch_statistics(h))
  assert c.rank == 3
  assert np.isnan(diagnostics.condition_number(np.zeros((2, 2))))
  with pytest.raises(ValueError, match='matrix'):
    diagnostics.condition_number(np.ones(3))


def test_per_channel_statistics_broadcast_over_the_window():
  stats = (np.array([1.0, 2.0]), np.array([4.0, 9.0]))
  p = diagnostics.preconditioner(stats, size=8, eps1=0.0, eps2=0.0)
  np.testing.assert_allclose(p[0, 1:], -np.tile([1.0 / 2, 2.0 / 3], 4))
  with pytest.raises(ValueError, match='divide'):
    diagnostics.preconditioner(stats, size=7)


def test_unknown_layer_raises():
  model = models.MLP()
  x = jnp.ones((2, 6))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='Dense_9'):
    diagnostics.neuron_hessian(
        model, variables, x, jnp.sum, layer='Dense_9', neuron=0
    )


def test_importable_on_its_own_and_flax_is_loaded_only_when_used():
  import subprocess
  import sys

  code = """if True:
    import sys
    import bnp_optax
    from bnp_optax import diagnostics as d
    assert 'flax' not in sys.modules, 'import'
    import numpy as np
    h = np.random.default_rng(0).normal(size=(20, 3))
    hess = d.hessian_from_inputs(h, np.full(20, 0.05))
    c = d.conditioning(hess, d.patch_statistics(h))
    d.kappa_d(d.patch_statistics(h)), d.conv_mean_error_bound(3, 8, 8, 1.0)
    assert 'flax' not in sys.modules, 'NumPy functions'
    assert 'neuron_hessian' in dir(d)
    assert 'flax' not in sys.modules, 'dir'
    d.neuron_hessian
    assert 'flax' in sys.modules
    print(len(d.__all__))
  """
  out = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  assert int(out.stdout) == len(diagnostics.__all__)


def test_figure8_script_runs(tmp_path):
  """notebooks/figure8_cifar10.py on a tiny stand-in for CIFAR-10."""
  import pathlib
  import subprocess
  import sys

  rng = np.random.default_rng(0)
  (tmp_path / 'cifar10').mkdir()
  for split, n in (('train', 180), ('test', 20)):
    np.savez(tmp_path / 'cifar10' / f'cifar10_{split}.npz',
             x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, n))
  script = pathlib.Path(__file__).parent.parent / 'notebooks' / (
      'figure8_cifar10.py')
  out = tmp_path / 'figure8.npz'
  result = subprocess.run(
      [sys.executable, str(script), '--data-dir', str(tmp_path),
       '--epochs', '1', '--results', str(tmp_path / 'results'), '--out',
       str(out)],
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'kappa(D)' in result.stdout
  with np.load(out) as f:
    assert f['kappa_hessian'].shape == (3,)  # 180 / 60 iterations
    for key in ('kappa_hessian', 'kappa_preconditioned', 'kappa_d'):
      assert np.all(np.isfinite(f[key]) & (f[key] >= 1)), key
