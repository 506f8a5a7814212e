"""Flax NNX: zero-change statistics, nnx.Optimizer, nnx.jit."""

import re
import threading

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from tests import models
from tests.test_oracle import oracle_precondition


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs),
                            nnx.Linear(5, 3, rngs=rngs)])
    self.norm = nnx.LayerNorm(5, rngs=rngs)

  def __call__(self, x):
    x = self.norm(jax.nn.relu(self.layers[0](x)))
    return self.layers[1](x)


def test_optimizer_step_matches_numpy_oracle():
  rng = np.random.default_rng(0)
  lr = 0.1
  with jax.enable_x64(True):
    model = MLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p.astype(jnp.float64), params))
    optimizer = nnx.Optimizer(model, bnp_optax.bnp(lr), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
      traces.append(None)
      def loss_fn(model):
        out, layer_stats = bnp_optax.nnx.apply(model, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            out, y)), layer_stats
      (_, layer_stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
          model)
      optimizer.update(model, grads, layer_stats=layer_stats)
      return layer_stats

    running = {i: (np.zeros(n), np.ones(n)) for i, n in ((0, 6), (1, 5))}
    for step in range(3):
      x = jnp.asarray(models.badly_scaled_inputs(rng, (4, 6)))
      y = jnp.asarray(rng.integers(0, 3, size=4))
      before = jax.tree.map(np.asarray, nnx.to_pure_dict(
          nnx.state(model, nnx.Param)))
      grads = nnx.grad(lambda m: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(m(x), y)))(model)
      grads = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
      # NumPy forward pass for the layers' inputs.
      l0 = before['layers'][0]
      h1 = np.maximum(np.asarray(x) @ l0['kernel'] + l0['bias'], 0)
      norm = before['norm']
      h1n = (h1 - h1.mean(-1, keepdims=True)) / np.sqrt(
          h1.var(-1, keepdims=True) + 1e-6) * norm['scale'] + norm['bias']
      inputs = {0: np.asarray(x), 1: h1n}
      layer_stats = train_step(model, optimizer, x, y)
      after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      for i in (0, 1):
        g = grads['layers'][i]
        g_w, g_b, mu, var = oracle_precondition(
            inputs[i], g['kernel'], g['bias'], *running[i], positions=1,
            rho=0.99)
        running[i] = (mu, var)
        np.testing.assert_allclose(
            after['layers'][i]['kernel'], before['layers'][i]['kernel']
            - lr * g_w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            after['layers'][i]['bias'], before['layers'][i]['bias']
            - lr * g_b, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(  # LayerNorm passes through: plain SGD
          after['norm']['scale'], before['norm']['scale']
          - lr * grads['norm']['scale'], rtol=1e-10)
      del step
  assert len(traces) == 1
  # Keyed by layer path, as the optimizer's running statistics.
  assert set(layer_stats) == {'layers/0', 'layers/1'}


def test_linear_general_and_grouped_conv_need_and_get_layer_specs():
  class Mixed(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)
      self.head = nnx.LinearGeneral((5, 6), 3, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):  # (N, 5, 5, 4)
      h = jax.nn.relu(self.conv(x))
      return self.head(h.mean(axis=1))

  model = Mixed(nnx.Rngs(0))
  specs = bnp_optax.nnx.layer_specs(model)
  assert specs['conv'].feature_groups == 2
  assert specs['head'].fan_in_axes == (0, 1)
  optimizer = nnx.Optimizer(model, bnp_optax.bnp(0.1, layer_specs=specs),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      out, stats = bnp_optax.nnx.apply(model, x)
      return jnp.sum(out ** 2), stats
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, layer_stats=stats)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  running = optimizer.opt_state[0].running_stats
  assert running['conv'].mean.shape == (4,)
  assert running['head'].mean.shape == (5, 6)
  assert losses[-1] < losses[0]


def test_conv_transpose_is_passed_through_with_its_reason():
  class Up(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 2, (3, 3), rngs=rngs)
      self.up = nnx.ConvTranspose(2, 2, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x):
      return self.up(nnx.relu(self.conv(x)))

  model = Up(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 2)) + 3
  optimizer = nnx.Optimizer(model, bnp_optax.bnp(0.1), wrt=nnx.Param)

  def loss_fn(model):
    out, layer_stats = bnp_optax.nnx.apply(model, x)
    return jnp.mean(out ** 2), layer_stats

  (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  assert isinstance(stats['up'], bnp_optax.NotPreconditioned)
  params = nnx.state(model, nnx.Param)
  coverage = bnp_optax.describe_coverage(params, stats)
  assert coverage['up/kernel'].startswith(
      'pass-through: a ConvTranspose, which BNP does not precondition (a '
      'transposed convolution sees a zero-dilated input)')
  assert coverage['conv/kernel'] == 'conv kernel'
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  optimizer.update(model, grads, layer_stats=stats)
  after = nnx.state(model, nnx.Param)
  # SGD on the transposed conv, BNP on the conv.
  np.testing.assert_allclose(
      after['up']['kernel'][...],
      before['up']['kernel'][...] - 0.1 * grads['up']['kernel'][...],
      rtol=1e-6)
  assert not np.allclose(
      after['conv']['kernel'][...],
      before['conv']['kernel'][...] - 0.1 * grads['conv']['kernel'][...])


def test_layer_outside_the_model_is_an_error():
  outside = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  class Uses(nnx.Module):
    def __init__(self):
      self.scale = nnx.Param(jnp.ones(2))

    def __call__(self, x):
      return outside(x) * self.scale

  with pytest.raises(ValueError, match='not part of the model'):
    bnp_optax.nnx.apply(Uses(), jnp.ones((3, 2)))


def test_calling_the_model_directly_records_nothing():
  model = MLP(nnx.Rngs(0))
  y = model(jnp.ones((2, 6)))
  out, stats = bnp_optax.nnx.apply(model, jnp.ones((2, 6)))
  np.testing.assert_allclose(y, out)
  assert float(stats['layers/0'].batch_size) == 2


def test_registered_layer_type_is_measured():
  class Affine(nnx.Module):  # y = x @ kernel + bias
    def __init__(self, n_in, n_out, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out)))
      self.bias = nnx.Param(jnp.zeros(n_out))

    def __call__(self, x):
      return x @ self.kernel[...] + self.bias[...][None, :]

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.affine = Affine(3, 2, rngs)

    def __call__(self, x):
      return self.affine(x)

  model = Net(nnx.Rngs(0))
  x = jnp.arange(12.0).reshape(4, 3)
  with pytest.raises(ValueError, match=re.escape(
      "no statistics in layer_stats for the layers ['affine']")):
    _, stats = bnp_optax.nnx.apply(model, x)
    tx = bnp_optax.scale_by_bnp()
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx.update(params, tx.init(params), layer_stats=stats)
  bnp_optax.nnx.register_layer(
      Affine, lambda module, args, kwargs, outputs:
      bnp_optax.input_statistics(args[0]))
  _, stats = bnp_optax.nnx.apply(model, x)
  np.testing.assert_allclose(stats['affine'].mean, np.mean(x, 0))
  tx = bnp_optax.scale_by_bnp()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, _ = tx.update(params, tx.init(params), layer_stats=stats)
  assert bnp_optax.describe_coverage(params, stats)['affine/kernel'] == (
      'dense kernel')
  del updates


def test_layer_calls_are_patched_only_while_apply_runs():
  class Sub(nnx.Linear):  # inherits nnx.Linear.__call__
    pass

  bnp_optax.nnx.register_layer(
      Sub, lambda module, args, kwargs, outputs:
      bnp_optax.input_statistics(args[0]))
  original = nnx.Linear.__dict__['__call__']
  seen = []

  class Probe(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(2, 2, rngs=rngs)
      self.sub = Sub(2, 2, rngs=rngs)

    def __call__(self, x):
      seen.append(nnx.Linear.__dict__['__call__'] is original)
      return self.sub(self.linear(x))

  model = Probe(nnx.Rngs(0))
  _, stats = bnp_optax.nnx.apply(model, jnp.ones((3, 2)))
  assert set(stats) == {'linear', 'sub'}
  assert seen == [False]
  assert nnx.Linear.__dict__['__call__'] is original
  assert '__call__' not in Sub.__dict__
  with pytest.raises(ZeroDivisionError):
    bnp_optax.nnx.apply(lambda x: 1 / 0, jnp.ones(1))
  assert nnx.Linear.__dict__['__call__'] is original


def test_apply_in_one_thread_while_another_calls_the_model():
  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 6))
  errors = []
  stop = threading.Event()

  def call_directly():
    try:
      while not stop.is_set():
        model(x)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=call_directly)
  thread.start()
  try:
    for _ in range(5):
      _, stats = bnp_optax.nnx.apply(model, x)
      np.testing.assert_allclose(stats['layers/0'].mean, np.mean(x, 0),
                                 rtol=1e-6)
      assert float(stats['layers/0'].batch_size) == 4
  finally:
    stop.set()
    thread.join()
  assert not errors
  assert '__call__' in nnx.Linear.__dict__
  assert not hasattr(nnx.Linear.__call__, '__wrapped__')


def test_layer_specs_come_from_the_registry():
  class Wide(nnx.LinearGeneral):  # registered without a spec_fn
    pass

  class Grouped(nnx.Module):  # kernel (c_in / groups, c_out), two groups
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (2, 6)))

    def __call__(self, x):
      return x

  spec = bnp_optax.LayerSpec(spatial_axes=(), fan_in_axes=(0,),
                             feature_groups=2)
  bnp_optax.nnx.register_layer(
      Wide, lambda module, args, kwargs, outputs: None)
  bnp_optax.nnx.register_layer(
      Grouped, lambda module, args, kwargs, outputs: None,
      spec_fn=lambda module: spec)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.wide = Wide((2, 3), 4, axis=(-2, -1), rngs=rngs)
      self.grouped = Grouped(rngs)
      self.up = nnx.ConvTranspose(2, 2, (3, 3), rngs=rngs)

  specs = bnp_optax.nnx.layer_specs(Net(nnx.Rngs(0)))
  assert set(specs) == {'wide', 'grouped'}  # not the refused ConvTranspose
  assert specs['wide'].fan_in_axes == (0, 1)
  assert specs['grouped'] is spec


class _ScanBlock(nnx.Module):
  def __init__(self, dim, *, rngs):
    self.linear = nnx.Linear(dim, dim, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.linear(x))


class _ScanMLP(nnx.Module):
  """Flax's NNX scan over layers: blocks built by nnx.vmap, run by nnx.scan."""

  def __init__(self, dim, *, n_layers, rngs):
    self.n_layers = n_layers

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_block(rngs):
      return _ScanBlock(dim, rngs=rngs)

    self.layers = create_block(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def scan_fn(x, block):
      return block(x)

    return scan_fn(x, self.layers)


class _UnrolledMLP(nnx.Module):
  def __init__(self, blocks):
    self.blocks = nnx.List(blocks)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def _train(model, x, steps=3):
  tx = bnp_optax.scale_by_bnp(rho=0.5,
                              layer_specs=bnp_optax.nnx.layer_specs(model))
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    def loss_fn(model):
      out, layer_stats = bnp_optax.nnx.apply(model, x)
      return jnp.sum(jnp.sin(out)), layer_stats
    (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, layer_stats=stats)
    return stats

  for _ in range(steps):
    stats = step(model, optimizer, x)
  return stats


def test_scan_over_layers_trains_like_the_unrolled_model():
  with jax.enable_x64(True):
    model = _ScanMLP(4, n_layers=5, rngs=nnx.Rngs(0))
    # The stacked (5, 4, 4) kernel: one Dense layer per slice, as the
    # tracing route lays it out.
    specs = bnp_optax.nnx.layer_specs(model)
    assert specs == {'layers/linear': bnp_optax.LayerSpec(
        spatial_axes=(), fan_in_axes=(1,), independent_axes=(0,))}
    stacked = nnx.state(model, nnx.Param)['layers']['linear']
    blocks = []
    for i in range(5):
      block = _ScanBlock(4, rngs=nnx.Rngs(i))
      block.linear.kernel[...] = stacked['kernel'][...][i]
      block.linear.bias[...] = stacked['bias'][...][i]
      blocks.append(block)
    unrolled = _UnrolledMLP(blocks)
    x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0),
                                               (6, 4)))
    stats = _train(model, x)
    assert stats['layers/linear'].mean.shape == (5, 4)
    _train(unrolled, x)
    got = nnx.state(model, nnx.Param)['layers']['linear']
    for i in range(5):
      want = unrolled.blocks[i].linear
      np.testing.assert_allclose(got['kernel'][...][i], want.kernel[...],
                                 rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(got['bias'][...][i], want.bias[...],
                                 rtol=1e-10, atol=1e-12)


def test_scan_over_a_shared_layer_names_the_tracing_route():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.block = _ScanBlock(3, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, None), out_axes=nnx.Carry, length=2)
      def scan_fn(x, block):
        return block(x)
      return scan_fn(x, self.block)

  with jax.enable_x64(True), pytest.raises(ValueError, match=re.escape(
      'use the tracing route: graphdef, params, rest = nnx.split(model, '
      'nnx.Param, ...)')):
    bnp_optax.nnx.apply(Shared(nnx.Rngs(0)), jnp.ones((2, 3)))
