"""``scale_by_bnp(graft=True)``: BNP's direction, the raw gradient's size.

The oracle is the NumPy implementation of the paper in ``test_oracle``
followed by the grafting rule written out in NumPy: each layer's
preconditioned ``(G_w, G_b)`` rescaled to the norm of its raw ``(G_w, G_b)``.
"""

import functools
import importlib.util
import pathlib

from flax import nnx
from flax import serialization
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _train
import bnp_optax.nnx
import bnp_optax.tracing
from tests import models
from tests import test_oracle


def _norm(*arrays):
  return np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                     for a in arrays if a is not None))


def oracle_graft(raw_w, raw_b, new_w, new_b):
  """The grafting rule in NumPy, one layer."""
  scale = _norm(raw_w, raw_b) / _norm(new_w, new_b)
  return new_w * scale, None if new_b is None else new_b * scale


@pytest.mark.parametrize('model_name,batch_size', [('mlp', 1), ('cnn', 7)])
def test_matches_numpy_oracle_over_several_steps(model_name, batch_size):
  model_cls, in_shape, np_forward = test_oracle.MODELS[model_name]
  model = model_cls()
  lr, rho, num_steps = 0.05, 0.9, 4
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x0 = jnp.asarray(models.badly_scaled_inputs(rng, (batch_size, *in_shape)))
    params = model.init(jax.random.key(1), x0)['params']
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    tx = bnp_optax.bnp(lr, rho=rho, graft=True)
    opt_state = tx.init(params)

    def loss(params, x, y):
      out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          out, y)), stats

    @jax.jit
    def step(params, opt_state, x, y):
      grads, stats = jax.grad(loss, has_aux=True)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     layer_stats=stats)
      return optax.apply_updates(params, updates), opt_state

    raw_grad = jax.jit(jax.grad(lambda p, x, y: loss(p, x, y)[0]))
    np_params = jax.tree.map(np.asarray, params)
    np_running = {
        name: (np.zeros(p['kernel'].shape[-2]), np.ones(p['kernel'].shape[-2]))
        for name, p in np_params.items()}
    for _ in range(num_steps):
      x = models.badly_scaled_inputs(rng, (batch_size, *in_shape))
      y = rng.integers(0, 3, size=batch_size)
      grads = jax.tree.map(np.asarray, raw_grad(np_params, x, y))
      inputs, *rest = np_forward(np_params, x)
      positions = rest[0] if model_name == 'cnn' else {k: 1 for k in inputs}
      new_params = {}
      for name, g in grads.items():
        mu, var = np_running[name]
        g_w, g_b, mu, var = test_oracle.oracle_precondition(
            inputs[name], g['kernel'], g.get('bias'), mu, var,
            positions=positions[name], rho=rho)
        g_w, g_b = oracle_graft(g['kernel'], g.get('bias'), g_w, g_b)
        np_running[name] = (mu, var)
        new_params[name] = {'kernel': np_params[name]['kernel'] - lr * g_w}
        if g_b is not None:
          new_params[name]['bias'] = np_params[name]['bias'] - lr * g_b
      np_params = new_params
      params, opt_state = step(params, opt_state, jnp.asarray(x),
                               jnp.asarray(y))
      for name in np_params:
        for leaf in np_params[name]:
          assert test_oracle._rel_err(  # pylint: disable=protected-access
              params[name][leaf], np_params[name][leaf]) < 1e-10


def _setup(model=None, n=5, seed=0):
  model = model or models.CNN()
  rng = np.random.default_rng(seed)
  in_shape = (6, 6, 2) if isinstance(model, models.CNN) else (6,)
  x = jnp.asarray(
      models.badly_scaled_inputs(rng, (n, *in_shape)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 3, size=n))
  params = model.init(jax.random.key(0), x)['params']

  def grads_and_stats(params, x, y):
    def loss(params):
      out, stats = bnp_optax.linen.apply(model, {'params': params}, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          out, y)), stats
    return jax.grad(loss, has_aux=True)(params)

  return model, params, x, y, grads_and_stats


def _layer_norms(tree):
  return {name: _norm(*leaves.values()) for name, leaves in tree.items()}


def test_off_is_the_papers_update_bit_for_bit():
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  results = []
  for tx in (bnp_optax.scale_by_bnp(), bnp_optax.scale_by_bnp(graft=False)):
    update = jax.jit(functools.partial(tx.update, layer_stats=stats))
    results.append(update(grads, tx.init(params), params))
  jax.tree.map(np.testing.assert_array_equal, *results)


@pytest.mark.parametrize('graft', [True, 'traced'])
def test_each_layer_takes_the_raw_gradients_norm(graft):
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  plain = bnp_optax.scale_by_bnp()
  want, _ = jax.jit(functools.partial(plain.update, layer_stats=stats))(
      grads, plain.init(params), params)

  @jax.jit
  def update(flag):
    tx = bnp_optax.scale_by_bnp(graft=True if graft is True else flag)
    return tx.update(grads, tx.init(params), params, layer_stats=stats)[0]

  got = update(jnp.asarray(True))
  got_norms, raw_norms = _layer_norms(got), _layer_norms(grads)
  for name in grads:
    assert got_norms[name] == pytest.approx(raw_norms[name], rel=1e-5)
    # The direction is BNP's: a positive multiple of the paper's update.
    scale = raw_norms[name] / _layer_norms(want)[name]
    for leaf in grads[name]:
      np.testing.assert_allclose(got[name][leaf], want[name][leaf] * scale,
                                 rtol=1e-5, atol=1e-7)
  if graft == 'traced':  # a traced False: the paper's update (up to fusion)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6),
                 update(jnp.asarray(False)), want)


def test_zero_gradients_stay_zero_and_finite():
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  grads = jax.tree.map(jnp.zeros_like, grads)
  grads['Conv_1']['kernel'] = jnp.ones_like(grads['Conv_1']['kernel'])
  tx = bnp_optax.scale_by_bnp(graft=True)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                                  layer_stats=stats)
  for name, leaves in updates.items():
    for leaf, value in leaves.items():
      assert np.all(np.isfinite(value)), (name, leaf)
      if name != 'Conv_1':
        assert not np.any(value), (name, leaf)
  assert _norm(*updates['Conv_1'].values()) == pytest.approx(
      _norm(*grads['Conv_1'].values()), rel=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dtypes_stable_and_no_retracing(dtype):
  _, params, x, y, grads_and_stats = _setup()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  tx = bnp_optax.bnp(0.1, momentum=0.9, graft=True)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    grads, stats = grads_and_stats(params, x.astype(dtype), y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  dtypes = lambda t: jax.tree.map(lambda a: a.dtype, t)
  new_params, new_state, updates = step(params, state, x, y)
  new_params, new_state, updates = step(new_params, new_state, x, y)
  assert len(traces) == 1
  assert dtypes(new_state) == dtypes(state)
  assert dtypes(updates) == dtypes(params)
  assert all(np.all(np.isfinite(np.asarray(u, np.float32)))
             for u in jax.tree.leaves(updates))


def _norms_match(grads, updates, layers):
  for name in layers:
    assert _norm(*updates[name].values()) == pytest.approx(
        _norm(*grads[name].values()), rel=1e-5)


def test_nnx_route():
  model = nnx.Sequential(nnx.Linear(3, 16, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, bnp_optax.bnp(1.0, graft=True),
                            wrt=nnx.Param)
  x = jnp.arange(24.0).reshape(8, 3)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(
      nnx.state(model, nnx.Param)))

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      out, layer_stats = bnp_optax.nnx.apply(model, x)
      return jnp.mean((out - 1.0) ** 2), layer_stats

    (_, layer_stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model)
    optimizer.update(model, grads, layer_stats=layer_stats)
    return grads

  grads = nnx.to_pure_dict(train_step(model, optimizer))
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  steps = jax.tree.map(lambda a, b: a - b, before, after)
  _norms_match(grads['layers'], steps['layers'], [0, 2])


@pytest.mark.parametrize('library', ['equinox', 'haiku'])
def test_tracing_route(library):
  x = jnp.arange(24.0).reshape(8, 3)
  if library == 'equinox':
    import equinox as eqx  # the test extra installs it
    model = eqx.nn.MLP(3, 2, width_size=16, depth=1, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  else:
    import haiku as hk  # the test extra installs it
    net = hk.without_apply_rng(hk.transform(
        lambda x: hk.nets.MLP([16, 2])(x)))
    params, fn = net.init(jax.random.key(0), x), net.apply
  tx = bnp_optax.scale_by_bnp(
      graft=True, layer_specs=bnp_optax.tracing.layer_specs(fn, params, x))

  def loss_fn(params):
    out, layer_stats = bnp_optax.tracing.apply(fn, params, x)
    return jnp.mean((out - 1.0) ** 2), layer_stats

  grads, stats = jax.grad(loss_fn, has_aux=True)(params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params,
                                  layer_stats=stats)
  if library == 'equinox':
    pairs = [(g, u) for g, u in zip(grads.layers, updates.layers)]
    for g, u in pairs:
      assert _norm(u.weight, u.bias) == pytest.approx(
          _norm(g.weight, g.bias), rel=1e-5)
  else:
    _norms_match(grads, updates, list(grads))
  plain = bnp_optax.scale_by_bnp(
      layer_specs=bnp_optax.tracing.layer_specs(fn, params, x))
  want, _ = plain.update(grads, plain.init(params), params,
                         layer_stats=stats)
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(updates), jax.tree.leaves(want)))


def test_multi_steps_equals_one_step_on_the_whole_batch():
  model, params, x, y, grads_and_stats = _setup(models.MLP(), n=6)
  big = bnp_optax.bnp(0.1, graft=True)
  grads, stats = grads_and_stats(params, x, y)
  want, _ = big.update(grads, big.init(params), params, layer_stats=stats)
  tx = bnp_optax.multi_steps(bnp_optax.bnp(0.1, graft=True),
                             every_k_schedule=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(3):
    grads, stats = grads_and_stats(params, x[2 * i:2 * i + 2],
                                   y[2 * i:2 * i + 2])
    updates, state = update(grads, state, params, layer_stats=stats)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      u, v, rtol=1e-5, atol=1e-7), updates, want)
  del model


def test_inject_hyperparams_matches_the_plain_optimizer():
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  injected = optax.inject_hyperparams(bnp_optax.bnp)(
      learning_rate=0.1, momentum=0.9, graft=True)
  plain = bnp_optax.bnp(0.1, momentum=0.9, graft=True)
  got, state = jax.jit(functools.partial(
      injected.update, layer_stats=stats))(grads, injected.init(params),
                                           params)
  want, _ = plain.update(grads, plain.init(params), params,
                         layer_stats=stats)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6),
               got, want)
  state.hyperparams['learning_rate'] = jnp.asarray(0.05)
  half, _ = injected.update(grads, state, params, layer_stats=stats)
  assert np.isfinite(np.asarray(half['Conv_0']['kernel'])).all()


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 fake devices')
def test_sharded_batch_gives_the_single_device_update():
  _, params, x, y, grads_and_stats = _setup(n=16)
  tx = bnp_optax.bnp(0.1, momentum=0.9, graft=True)

  @jax.jit
  def step(params, state, x, y):
    grads, stats = grads_and_stats(params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  want = step(params, tx.init(params), x, y)
  mesh = jax.make_mesh((8,), ('batch',))
  on = lambda spec, t: jax.device_put(t, NamedSharding(mesh, spec))
  got = step(on(P(), params), on(P(), tx.init(params)), on(P('batch'), x),
             on(P('batch'), y))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      u, v, rtol=2e-5, atol=1e-6), got, want)


def test_checkpoint_round_trip_continues_bit_identically():
  _, params, x, y, grads_and_stats = _setup()
  tx = bnp_optax.bnp(0.1, momentum=0.9, graft=True)

  @jax.jit
  def step(params, state):
    grads, stats = grads_and_stats(params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  mid = step(*step(params, tx.init(params)))
  want = step(*mid)
  target = jax.tree.map(jnp.zeros_like, mid)
  restored = serialization.from_bytes(target, serialization.to_bytes(mid))
  got = step(*restored)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_the_studys_layer_size_matching_is_the_option():
  """The study's experiment-only ``layer`` mode is ``graft=True``."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
  spec = importlib.util.spec_from_file_location(
      'graft_study', path / 'graft_study.py')
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  results = {}
  for name, tx in (('option', bnp_optax.scale_by_bnp(graft=True)),
                   ('layer', study.sized_bnp('layer')),
                   ('leaf', study.sized_bnp('leaf'))):
    results[name] = tx.update(grads, tx.init(params), params,
                              layer_stats=stats)[0]
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5,
                                                       atol=1e-8),
               results['layer'], results['option'])
  for name in grads:  # leaf: kernel and bias each to their own raw norm
    for leaf in grads[name]:
      assert _norm(results['leaf'][name][leaf]) == pytest.approx(
          _norm(grads[name][leaf]), rel=1e-5)


def test_harness_method_grafts_at_the_baselines_rate():
  for key in (('fc', 'mnist', 60), ('cnn5', 'cifar10', 2)):
    assert (_methods.default_learning_rate(*key, 'bnp_graft')[0]
            == _methods.default_learning_rate(*key, 'vanilla')[0])
  _, params, x, y, grads_and_stats = _setup()
  grads, stats = grads_and_stats(params, x, y)
  tx = _train.make_optimizer(
      _train.RunConfig(method='bnp_graft', optimizer='sgd'), 0.5, 10)
  updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
  for name in grads:
    assert _norm(*updates[name].values()) == pytest.approx(
        0.5 * _norm(*grads[name].values()), rel=1e-5)
