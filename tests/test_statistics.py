"""Input statistics: reductions that stay accurate, exact merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnp_optax


@pytest.mark.parametrize('dtype, mean, spread', [
    (jnp.float32, 1000.0, 0.25),
    (jnp.float32, 1e5, 1.0),
    # bfloat16 resolves 16 at 3000: the spread must survive the rounding.
    (jnp.bfloat16, 3000.0, 40.0),
])
# On CPU, up to 128 rows of at least 256 columns are summed as a GEMV, the
# rest as a reduction.
@pytest.mark.parametrize('rows, columns', [(60, 3), (256, 3), (60, 300)])
def test_large_mean_small_spread_keeps_its_variance(dtype, mean, spread, rows,
                                                    columns):
  rng = np.random.default_rng(0)
  x64 = mean + spread * rng.standard_normal((rows, columns))
  x = jnp.asarray(x64, dtype)
  stats = jax.jit(bnp_optax.input_statistics)(x)
  assert stats.mean.dtype == stats.variance.dtype == jnp.float32
  exact = np.asarray(x, np.float64)  # the values as rounded to ``dtype``
  np.testing.assert_allclose(stats.mean, exact.mean(0), rtol=1e-6)
  # Naive E[x^2] - E[x]^2 in float32 loses all digits of the first two cases
  # (its rounding error is ~6e-8 * mean^2); the two-pass reduction does not.
  np.testing.assert_allclose(stats.variance, exact.var(0), rtol=1e-3)
  assert np.all(np.asarray(stats.variance) > 0)


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_single_row_has_zero_variance_exactly(dtype):
  # A Dense layer at batch size 1: the passes must give the row and zero.
  from bnp_optax._src import statistics  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(dtype == np.float64):
    x = jnp.asarray([[3.0, -1e6 + 0.1, 7.5]], dtype)
    stats = jax.jit(bnp_optax.input_statistics)(x)
    np.testing.assert_array_equal(stats.variance, np.zeros(3))
    np.testing.assert_array_equal(stats.mean, np.asarray(x[0]))
    np.testing.assert_array_equal(stats.mean_residual, np.zeros(3))
    assert float(stats.count) == float(stats.batch_size) == 1
    passes = jax.jit(statistics._shifted_two_pass_folded,  # pylint: disable=protected-access
                     static_argnums=1)(x, 1)
    for got, want in zip((stats.mean, stats.mean_residual, stats.variance),
                         passes):
      np.testing.assert_array_equal(got, want)


def test_deep_mlp_step_adds_no_matrix_vector_products():
  # XLA:CPU compiles every matrix-vector product on its own (one LLVM kernel
  # per layer), where identical fusions of same-shape layers share one; so
  # BNP's statistics and bias absorption of narrow layers are reductions,
  # and its step has the dot products of SGD's step, no more.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu,
                         nn.Dense(16), nn.relu, nn.Dense(4)])
  x = jnp.ones((8, 16))
  params = model.init(jax.random.key(0), x)['params']

  def step(tx, with_stats):
    def run(params, opt_state):
      def loss(p):
        if with_stats:
          y, stats = bnp_optax.linen.apply(model, {'params': p}, x)
        else:
          y, stats = model.apply({'params': p}, x), None
        return jnp.sum(y ** 2), stats
      grads, stats = jax.grad(loss, has_aux=True)(params)
      kwargs = {'layer_stats': stats} if with_stats else {}
      updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
      return optax.apply_updates(params, updates), opt_state
    text = jax.jit(run).lower(params, tx.init(params)).compile().as_text()
    return text.count(' dot(') + text.count(' dot_general(')

  sgd = step(optax.sgd(0.1), False)
  bnp = step(bnp_optax.bnp(0.1), True)
  assert bnp == sgd


def test_conv_shaped_input_reduces_over_batch_and_space():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 5, 4, 2)) * [1.0, 10.0] + [0.0, 5.0]
  with jax.enable_x64(True):
    stats = bnp_optax.input_statistics(jnp.asarray(x), batch_axes=(0,),
                                       positions=20)
    np.testing.assert_allclose(stats.mean, x.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, x.var((0, 1, 2)), rtol=1e-12)
  assert float(stats.count) == 60
  assert float(stats.batch_size) == 3
  assert float(stats.positions) == 20


def test_merge_equals_statistics_of_the_concatenation():
  rng = np.random.default_rng(2)
  parts = [rng.standard_normal((n, 4)) * 3 + i for i, n in enumerate((1, 5, 2))]
  with jax.enable_x64(True):
    merged = bnp_optax.merge_statistics([
        bnp_optax.input_statistics(jnp.asarray(p)) for p in parts])
    whole = np.concatenate(parts)
    np.testing.assert_allclose(merged.mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.variance, whole.var(0), rtol=1e-12)
  assert float(merged.count) == float(merged.batch_size) == 8


def test_no_gradient_flows_through_statistics():
  x = jnp.arange(12.0).reshape(4, 3)
  grad = jax.grad(lambda x: jnp.sum(bnp_optax.input_statistics(
      x).variance))(x)
  np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_feature_axes_keep_several_axes_in_their_order():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 3, 5, 2))
  with jax.enable_x64(True):
    stats = bnp_optax.input_statistics(jnp.asarray(x), feature_axes=(3, 1))
    want = np.transpose(x, (0, 2, 3, 1)).reshape(20, 2, 3)
    np.testing.assert_allclose(stats.mean, want.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, want.var(0), rtol=1e-12)
  assert float(stats.batch_size) == 20


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
@pytest.mark.parametrize('shape', [
    (8192, 3),  # tall, few channels: folded 32 rows at a time
    (4096, 16),  # folded 4 at a time
    (520, 3),  # folded only until 130 rows are left
    (130, 3),  # short: never folded
    (8192, 64),  # wide enough: never folded
])
def test_folded_column_sums_give_the_statistics_of_the_plain_path(
    dtype, shape):
  # statistics._fold_factor: on CPU, tall inputs with few columns are summed
  # as (rows / k, k * columns). Same algorithm, other order of additions.
  from bnp_optax._src import statistics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x64 = 1e6 + rng.standard_normal(shape)
  with jax.enable_x64(dtype == np.float64):
    x = jnp.asarray(x64, dtype)
    fold = statistics._fold_factor(x)  # pylint: disable=protected-access
    assert (fold > 1) == (shape[0] > 256 and shape[1] < 64)
    two_pass = jax.jit(
        statistics._shifted_two_pass_folded,  # pylint: disable=protected-access
        static_argnums=1)
    folded, plain = two_pass(x, fold), two_pass(x, 1)
    public = jax.jit(bnp_optax.input_statistics)(x)
    exact = np.asarray(x, np.float64)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    atol = 1e-6 if dtype == np.float32 else 1e-8  # the mean is 1e6
    for mean, residual, variance in (folded, plain, (
        public.mean, public.mean_residual, public.variance)):
      assert variance.dtype == dtype
      np.testing.assert_allclose(variance, exact.var(0), rtol=rtol)
      np.testing.assert_allclose(
          np.asarray(mean, np.float64) + np.asarray(residual, np.float64),
          exact.mean(0), rtol=0, atol=atol)
    np.testing.assert_allclose(folded[2], plain[2], rtol=rtol)
