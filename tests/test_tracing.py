"""bnp_optax.tracing: layers found in the jaxpr, statistics as linen's.

The reference everywhere is the linen interceptor (``bnp_optax.linen.apply``)
on a Flax model with the same weights: the same BNP steps (float64, 1e-6)
for Equinox, Haiku, plain JAX and unregistered linen layers, the same
statistics for every layer type the interceptor knows.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
from jax import lax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax import tracing
from tests import models

_STEPS = 3


def _train(apply_fn, params, specs, batches):
  """A few BNP + momentum steps under jit; the parameters after each."""
  tx = bnp_optax.bnp(0.05, momentum=0.9, layer_specs=specs)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      out, stats = apply_fn(p, x)
      return jnp.mean(jnp.square(out - y)), stats

    grads, stats = jax.grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  history = []
  for x, y in batches:
    params, state = step(params, state, x, y)
    history.append(params)
  return history


def _batches(rng, in_shape, out_dim, batch=6):
  return [
      (jnp.asarray(models.badly_scaled_inputs(rng, (batch, *in_shape))),
       jnp.asarray(rng.standard_normal((batch, out_dim))))
      for _ in range(_STEPS)
  ]


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                             atol=1e-9)


class _FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(3)(x)


class _FlaxCNN(nn.Module):
  """Strided VALID conv, SAME conv, global mean, dense; NHWC."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding='VALID')(x))
    x = nn.relu(nn.Conv(4, (3, 3), padding='SAME')(x))
    return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


def _flax_reference(model, in_shape, out_dim, seed=0):
  """Batches, initial params and the parameter history under linen.apply."""
  rng = np.random.default_rng(seed)
  batches = _batches(rng, in_shape, out_dim)
  params = model.init(jax.random.key(seed), batches[0][0])['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  history = _train(
      lambda p, x: bnp_optax.linen.apply(model, {'params': p}, x),
      params, None, batches)
  return batches, params, history


def _traced_history(fn, params, batches):
  specs = tracing.layer_specs(fn, params, batches[0][0])
  return _train(lambda p, x: tracing.apply(fn, p, x), params, specs,
                batches)


def test_plain_jax_mlp_trains_as_linen():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxMLP(), (4,), 3)
    params = {'w0': ref['Dense_0']['kernel'], 'b0': ref['Dense_0']['bias'],
              'w1': ref['Dense_1']['kernel'], 'b1': ref['Dense_1']['bias']}

    def fn(p, x):
      h = jax.nn.relu(x @ p['w0'] + p['b0'][None])
      return h @ p['w1'] + p['b1'][None]

    assert tracing.describe(fn, params, batches[0][0]) == {
        'b0': 'dense bias', 'b1': 'dense bias', 'w0': 'dense kernel',
        'w1': 'dense kernel'}
    for want, got in zip(history, _traced_history(fn, params, batches)):
      for i in range(2):
        _close(got[f'w{i}'], want[f'Dense_{i}']['kernel'])
        _close(got[f'b{i}'], want[f'Dense_{i}']['bias'])


def test_equinox_mlp_trains_as_linen():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxMLP(), (4,), 3)
    mlp = eqx.nn.MLP(4, 3, 5, 1, activation=jax.nn.relu,
                     key=jax.random.key(0))
    mlp = eqx.tree_at(
        lambda m: [m.layers[i].weight for i in range(2)]
        + [m.layers[i].bias for i in range(2)], mlp,
        [ref[f'Dense_{i}']['kernel'].T for i in range(2)]
        + [ref[f'Dense_{i}']['bias'] for i in range(2)])
    params, static = eqx.partition(mlp, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    for want, got in zip(history, _traced_history(fn, params, batches)):
      for i in range(2):
        _close(got.layers[i].weight, want[f'Dense_{i}']['kernel'].T)
        _close(got.layers[i].bias, want[f'Dense_{i}']['bias'])


class _Permuted(eqx.Module):
  """An MLP behind an integer index array (a leaf ``jax.grad`` refuses)."""
  mlp: eqx.nn.MLP
  order: jax.Array

  def __call__(self, x):
    return self.mlp(x[self.order])


def test_equinox_idiom_filter_value_and_grad_on_the_module():
  with jax.enable_x64(True):
    mlp = eqx.nn.MLP(3, 2, 5, 1, key=jax.random.key(0))
    mlp = jax.tree.map(lambda a: a.astype(jnp.float64)
                       if eqx.is_inexact_array(a) else a, mlp)
    model = _Permuted(mlp, jnp.array([2, 0, 1]))
    x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0),
                                               (7, 3)))
    fn = lambda m, x: jax.vmap(m)(x)
    tx = bnp_optax.bnp(0.1, layer_specs=tracing.layer_specs(fn, model, x))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):  # as the Equinox how-to writes it
      def loss_fn(model):
        out, layer_stats = tracing.apply(fn, model, x)
        return jnp.sum(jnp.sin(out)), layer_stats
      (_, stats), grads = eqx.filter_value_and_grad(
          loss_fn, has_aux=True)(model)
      updates, opt_state = tx.update(
          grads, opt_state, eqx.filter(model, eqx.is_inexact_array),
          layer_stats=stats)
      return eqx.apply_updates(model, updates), opt_state

    got = step(model, opt_state)[0]
    # The functional route, partitioned by eqx.is_inexact_array.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    pfn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    def loss(p):
      out, layer_stats = tracing.apply(pfn, p, x)
      return jnp.sum(jnp.sin(out)), layer_stats
    grads, stats = jax.grad(loss, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    want = eqx.combine(eqx.apply_updates(params, updates), static)
    jax.tree.map(_close, eqx.filter(got, eqx.is_inexact_array),
                 eqx.filter(want, eqx.is_inexact_array))
    # eqx.is_array would hand the integer leaf to jax.grad.
    params, static = eqx.partition(model, eqx.is_array)
    with pytest.raises(TypeError, match='grad requires real- or complex'):
      jax.grad(lambda p: jnp.sum(jax.vmap(eqx.combine(p, static))(x)))(
          params)


class _EqxCNN(eqx.Module):
  conv0: eqx.nn.Conv2d
  conv1: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k0, k1, k2 = jax.random.split(key, 3)
    self.conv0 = eqx.nn.Conv2d(2, 3, 3, stride=2, key=k0)
    self.conv1 = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
    self.head = eqx.nn.Linear(4, 2, key=k2)

  def __call__(self, x):  # one example, CHW
    x = jax.nn.relu(self.conv0(x))
    x = jax.nn.relu(self.conv1(x))
    return self.head(jnp.mean(x, axis=(1, 2)))


def test_equinox_cnn_nchw_vmapped_trains_as_linen():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxCNN(), (9, 9, 2), 2)
    oihw = lambda k: jnp.transpose(k, (3, 2, 0, 1))
    cnn = eqx.tree_at(
        lambda m: (m.conv0.weight, m.conv0.bias, m.conv1.weight,
                   m.conv1.bias, m.head.weight, m.head.bias),
        _EqxCNN(jax.random.key(0)),
        (oihw(ref['Conv_0']['kernel']), ref['Conv_0']['bias'][:, None, None],
         oihw(ref['Conv_1']['kernel']), ref['Conv_1']['bias'][:, None, None],
         ref['Dense_0']['kernel'].T, ref['Dense_0']['bias']))
    params, static = eqx.partition(cnn, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(
        jnp.transpose(x, (0, 3, 1, 2)))
    assert set(tracing.describe(fn, params, batches[0][0]).values()) == {
        'conv kernel', 'conv bias', 'dense kernel', 'dense bias'}
    for want, got in zip(history, _traced_history(fn, params, batches)):
      for i in range(2):
        conv = getattr(got, f'conv{i}')
        _close(conv.weight, oihw(want[f'Conv_{i}']['kernel']))
        _close(conv.bias[:, 0, 0], want[f'Conv_{i}']['bias'])
      _close(got.head.weight, want['Dense_0']['kernel'].T)


def test_haiku_mlp_trains_as_linen():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxMLP(), (4,), 3)
    model = hk.without_apply_rng(hk.transform(
        lambda x: hk.nets.MLP([5, 3], activation=jax.nn.relu)(x)))
    params = {f'mlp/~/linear_{i}': {'w': ref[f'Dense_{i}']['kernel'],
                                    'b': ref[f'Dense_{i}']['bias']}
              for i in range(2)}
    jax.tree.map(lambda a, b: None, params,
                 model.init(jax.random.key(0), batches[0][0]))
    for want, got in zip(history,
                         _traced_history(model.apply, params, batches)):
      for i in range(2):
        _close(got[f'mlp/~/linear_{i}']['w'], want[f'Dense_{i}']['kernel'])
        _close(got[f'mlp/~/linear_{i}']['b'], want[f'Dense_{i}']['bias'])


def test_haiku_conv_net_trains_as_linen():
  def net(x):
    x = jax.nn.relu(hk.Conv2D(3, 3, stride=2, padding='VALID')(x))
    x = jax.nn.relu(hk.Conv2D(4, 3, padding='SAME')(x))
    return hk.Linear(2)(jnp.mean(x, axis=(1, 2)))

  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxCNN(), (9, 9, 2), 2)
    model = hk.without_apply_rng(hk.transform(net))
    names = {'conv2_d': 'Conv_0', 'conv2_d_1': 'Conv_1', 'linear': 'Dense_0'}
    params = {h: {'w': ref[f]['kernel'], 'b': ref[f]['bias']}
              for h, f in names.items()}
    jax.tree.map(lambda a, b: None, params,
                 model.init(jax.random.key(0), batches[0][0]))
    for want, got in zip(history,
                         _traced_history(model.apply, params, batches)):
      for h, f in names.items():
        _close(got[h]['w'], want[f]['kernel'])
        _close(got[h]['b'], want[f]['bias'])


def _lax_cnn(p, x):
  dn = ('NHWC', 'HWIO', 'NHWC')
  h = lax.conv_general_dilated(x, p['c0'], (2, 2), 'VALID',
                               dimension_numbers=dn)
  h = jax.nn.relu(h + p['d0'][None, None, None])
  h = lax.conv_general_dilated(h, p['c1'], (1, 1), 'SAME',
                               dimension_numbers=dn)
  h = jax.nn.relu(h + p['d1'][None, None, None])
  return jnp.mean(h, axis=(1, 2)) @ p['w'] + p['b'][None]


def test_plain_lax_conv_cnn_trains_as_linen():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxCNN(), (9, 9, 2), 2)
    params = {'c0': ref['Conv_0']['kernel'], 'd0': ref['Conv_0']['bias'],
              'c1': ref['Conv_1']['kernel'], 'd1': ref['Conv_1']['bias'],
              'w': ref['Dense_0']['kernel'], 'b': ref['Dense_0']['bias']}
    specs = tracing.layer_specs(_lax_cnn, params, batches[0][0])
    assert {k: v.bias for k, v in specs.items()} == {
        'c0': 'd0', 'c1': 'd1', 'w': 'b'}
    for want, got in zip(history, _traced_history(_lax_cnn, params,
                                                   batches)):
      for i in range(2):
        _close(got[f'c{i}'], want[f'Conv_{i}']['kernel'])
        _close(got[f'd{i}'], want[f'Conv_{i}']['bias'])
      _close(got['w'], want['Dense_0']['kernel'])


class _Affine(nn.Module):
  """A custom layer no integration registers."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.lecun_normal(),
                   (x.shape[-1], self.features))
    b = self.param('b', nn.initializers.zeros, (self.features,))
    return x @ w + b[None]


class _CustomMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(_Affine(5)(x))  # named _Affine_0: created first
    return _Affine(3)(h)


def test_unregistered_linen_layer_trains_as_dense():
  with jax.enable_x64(True):
    batches, ref, history = _flax_reference(_FlaxMLP(), (4,), 3)
    model = _CustomMLP()
    params = {f'_Affine_{i}': {'w': ref[f'Dense_{i}']['kernel'],
                               'b': ref[f'Dense_{i}']['bias']}
              for i in range(2)}
    fn = lambda p, x: model.apply({'params': p}, x)
    for want, got in zip(history, _traced_history(fn, params, batches)):
      for i in range(2):
        _close(got[f'_Affine_{i}']['w'], want[f'Dense_{i}']['kernel'])
        _close(got[f'_Affine_{i}']['b'], want[f'Dense_{i}']['bias'])


class _Siamese(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3)
    return dense(x) + dense(2 * x + 1)


_FLAX_LAYERS = {
    'dense': (nn.Dense(3), (5, 4)),
    'dense_3d_input': (nn.Dense(3), (2, 5, 4)),
    'dense_general': (nn.DenseGeneral((3, 2), axis=(-2, -1)), (5, 4, 2)),
    'dense_general_batch_dims': (
        nn.DenseGeneral(3, axis=-1, batch_dims=(0,)), (2, 5, 4)),
    'conv1d': (nn.Conv(3, (3,), strides=2), (2, 9, 2)),
    'conv2d_dilated_padded': (
        nn.Conv(3, (3, 3), kernel_dilation=2, padding=((1, 0), (2, 2))),
        (2, 8, 7, 2)),
    'conv2d_valid_strided': (
        nn.Conv(3, (2, 3), strides=(2, 1), padding='VALID'), (3, 8, 7, 2)),
    'conv3d': (nn.Conv(2, (3, 3, 3)), (2, 5, 5, 5, 2)),
    'conv_unbatched': (nn.Conv(2, (3, 3)), (6, 6, 2)),
    'conv_grouped': (nn.Conv(4, (3, 3), feature_group_count=2), (2, 6, 6, 4)),
    'conv_depthwise': (nn.Conv(6, (3, 3), feature_group_count=3),
                       (2, 6, 6, 3)),
    'shared_module': (_Siamese(), (5, 4)),
    'mlp': (_FlaxMLP(), (5, 4)),
}


@pytest.mark.parametrize('name', sorted(_FLAX_LAYERS))
def test_statistics_equal_the_linen_interceptor(name):
  model, shape = _FLAX_LAYERS[name]
  x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0),
                                             shape), jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  y_ref, ref = bnp_optax.linen.apply(model, {'params': params}, x)
  y, got = jax.jit(lambda p, x: tracing.apply(fn, p, x))(params, x)
  _close(y, y_ref)
  ref = bnp_optax._src.layers.flatten_layer_stats(ref)
  want_keys = {f'{k}/kernel' if k != '<root>' else 'kernel' for k in ref}
  assert set(got) == want_keys
  specs = tracing.layer_specs(fn, params, x)
  for key, r in ref.items():
    g = got[f'{key}/kernel' if key != '<root>' else 'kernel']
    np.testing.assert_allclose(g.mean, r.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.variance, r.variance, rtol=1e-4, atol=1e-4)
    for field in ('count', 'batch_size', 'positions'):
      assert float(getattr(g, field)) == float(getattr(r, field)), field
    kernel_shape = jax.tree.leaves(params)[0].shape
    want_spec = r.spec
    if want_spec is None:
      want_spec = bnp_optax._src.layout.infer_layer_spec(kernel_shape)
    assert g.spec == want_spec
    assert specs[f'{key}/kernel' if key != '<root>' else 'kernel'].spec == (
        want_spec)
  # Coverage agrees too: the same leaves are kernels and biases.
  described = tracing.describe(fn, params, x)
  assert described == bnp_optax.describe_coverage(params, ref)


_scanned = models.scanned


def _ensemble(collections):
  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):  # (members, N, features)
      dense = nn.vmap(nn.Dense, in_axes=0, out_axes=0,
                      variable_axes=collections,
                      split_rngs={'params': True})
      return dense(2)(x)
  return Ensemble()


@pytest.mark.parametrize('make, shape', [(_scanned, (6, 4)),
                                         (_ensemble, (2, 5, 3))])
def test_linen_scan_and_vmap_need_no_collection(make, shape):
  """The lifted layers are found as they are; linen needs its collection."""
  x = jnp.asarray(models.badly_scaled_inputs(np.random.default_rng(0),
                                             shape), jnp.float32)
  model = make({'params': 0})
  params = model.init(jax.random.key(0), x)['params']
  fn = lambda p, x: model.apply({'params': p}, x)
  _, got = tracing.apply(fn, params, x)
  with_collection = make({'params': 0, bnp_optax.linen.COLLECTION: 0})
  _, ref = bnp_optax.linen.apply(with_collection, {'params': params}, x)
  ref = bnp_optax._src.layers.flatten_layer_stats(ref)
  assert set(got) == {f'{k}/kernel' for k in ref}
  specs = tracing.layer_specs(fn, params, x)
  for key, r in ref.items():
    g = got[f'{key}/kernel']
    np.testing.assert_allclose(g.mean, r.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.variance, r.variance, rtol=1e-4, atol=1e-4)
    for field in ('count', 'batch_size', 'positions'):
      assert float(getattr(g, field)) == float(getattr(r, field)), field
    assert g.spec == r.spec == specs[f'{key}/kernel'].spec
    assert specs[f'{key}/kernel'].bias == f'{key}/bias'


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def _count(jaxpr, primitive):
  return sum(
      eqn.primitive.name == primitive
      and all(v.aval.ndim >= 2 for v in eqn.invars)
      for eqn in _equations(jaxpr))


def test_one_forward_pass_and_no_retrace():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 9, 9, 2)), jnp.float32)
  params = jax.tree.map(
      lambda p: p.astype(jnp.float32),
      _FlaxCNN().init(jax.random.key(0), x)['params'])
  params = {'c0': params['Conv_0']['kernel'], 'd0': params['Conv_0']['bias'],
            'c1': params['Conv_1']['kernel'], 'd1': params['Conv_1']['bias'],
            'w': params['Dense_0']['kernel'], 'b': params['Dense_0']['bias']}
  traces = []

  def fn(p, x):
    traces.append(None)
    return _lax_cnn(p, x)

  plain = lambda p: (jnp.sum(fn(p, x)), None)
  with_stats = lambda p: (lambda y, s: (jnp.sum(y), s))(
      *tracing.apply(fn, p, x))
  for primitive in ('dot_general', 'conv_general_dilated'):
    count = lambda f: _count(
        jax.make_jaxpr(jax.grad(f, has_aux=True))(params).jaxpr, primitive)
    assert count(with_stats) == count(plain)
  tx = bnp_optax.bnp(0.1, layer_specs=tracing.layer_specs(fn, params, x))

  @jax.jit
  def step(params, state, x):
    grads, stats = jax.grad(
        lambda p: (lambda y, s: (jnp.sum(y ** 2), s))(
            *tracing.apply(fn, p, x)), has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  traces.clear()
  params, state = step(params, state, x)
  params, state = step(params, state, x + 1)
  assert len(traces) == 1


def _stats_close(a, b, rtol=1e-5):
  np.testing.assert_allclose(a.mean, b.mean, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(a.variance, b.variance, rtol=rtol, atol=1e-6)
  for field in ('count', 'batch_size', 'positions'):
    np.testing.assert_allclose(getattr(a, field), getattr(b, field))


def _mlp(p, x):
  return jnp.tanh(x @ p['w'] + p['b'][None]) @ p['v']


_MLP_PARAMS = {'w': jnp.ones((3, 4)) / 3, 'b': jnp.zeros(4),
               'v': jnp.ones((4, 2))}


def test_under_caller_jit_grad_and_vmap():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)),
                  jnp.float32)
  ref = [tracing.apply(_mlp, _MLP_PARAMS, xi)[1] for xi in x]
  batched = jax.jit(jax.vmap(
      lambda xi: tracing.apply(_mlp, _MLP_PARAMS, xi)[1]))(x)
  for i, r in enumerate(ref):
    for k in r:
      _stats_close(jax.tree.map(lambda a: a[i], batched[k]), r[k])
  grads, stats = jax.grad(
      lambda p: (lambda y, s: (jnp.sum(y), s))(*tracing.apply(_mlp, p, x[0])),
      has_aux=True)(_MLP_PARAMS)
  want = jax.grad(lambda p: jnp.sum(_mlp(p, x[0])))(_MLP_PARAMS)
  jax.tree.map(_close, grads, want)
  _stats_close(stats['w'], bnp_optax.input_statistics(x[0]))


def test_remat_and_nested_jit():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)),
                  jnp.float32)
  inner = jax.jit(lambda p, x: jnp.tanh(x @ p['w'] + p['b'][None]))
  fn = lambda p, x: jax.checkpoint(inner)(p, x) @ p['v']
  _, ref = tracing.apply(_mlp, _MLP_PARAMS, x)
  _, got = jax.jit(lambda p: tracing.apply(fn, p, x))(_MLP_PARAMS)
  assert tracing.layer_specs(fn, _MLP_PARAMS, x) == tracing.layer_specs(
      _mlp, _MLP_PARAMS, x)
  for k in ref:
    _stats_close(got[k], ref[k])
  loss = lambda f: lambda p: jnp.sum(tracing.apply(f, p, x)[0] ** 2)
  jax.tree.map(_close, jax.grad(loss(fn))(_MLP_PARAMS),
               jax.grad(loss(_mlp))(_MLP_PARAMS))


def test_scan_with_a_shared_kernel_merges_the_steps():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  params = {'w': jnp.asarray(rng.standard_normal((3, 3)), jnp.float32),
            'b': jnp.zeros(3)}

  def fn(p, x):
    def body(h, _):
      return jnp.tanh(h @ p['w'] + p['b'][None]), h
    return lax.scan(body, x, None, length=4)

  (_, inputs), stats = jax.jit(lambda p: tracing.apply(fn, p, x))(params)
  assert tracing.layer_specs(fn, params, x)['w'].bias == 'b'
  _stats_close(stats['w'], bnp_optax.input_statistics(
      inputs.reshape(-1, 3)), rtol=1e-4)
  assert float(stats['w'].batch_size) == 20


def test_scan_over_stacked_layers_is_one_layer_per_step():
  """Kernels (steps, n, n) sliced by a scan train as separate layers."""
  rng = np.random.default_rng(0)
  n, depth = 4, 3
  with jax.enable_x64(True):
    stacked = {'w': jnp.asarray(rng.standard_normal((depth, n, n)) / 2),
               'b': jnp.asarray(rng.standard_normal((depth, n)))}

    def scanned(p, x):
      def body(h, wb):
        w, b = wb
        return jnp.tanh(h @ w + b[None]), None
      return lax.scan(body, x, (p['w'], p['b']))[0]

    def unrolled(p, x):
      for i in range(depth):
        x = jnp.tanh(x @ p[f'w{i}'] + p[f'b{i}'][None])
      return x

    specs = tracing.layer_specs(scanned, stacked, jnp.ones((6, n)))
    assert specs == {'w': bnp_optax.LeafLayer(
        bnp_optax.LayerSpec((), (1,), (0,)), 'b')}
    separate = {f'{k}{i}': stacked[k][i] for k in 'wb' for i in range(depth)}
    batches = _batches(rng, (n,), n)
    want = _traced_history(unrolled, separate, batches)
    got = _traced_history(scanned, stacked, batches)
    for w, g in zip(want, got):
      for i in range(depth):
        _close(g['w'][i], w[f'w{i}'])
        _close(g['b'][i], w[f'b{i}'])


def test_tied_weights_merge_statistics():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((5, 4)) * 3 + 1, jnp.float32)
  params = {'w': jnp.ones((4, 2)), 'b': jnp.zeros(2)}
  fn = lambda p, a, b: jnp.concatenate([a @ p['w'] + p['b'][None], b @ p['w']])
  _, stats = tracing.apply(fn, params, a, b)
  _stats_close(stats['w'], bnp_optax.input_statistics(
      jnp.concatenate([a, b])))
  # The bias is added to one of the two uses only: not the layer's bias.
  assert tracing.layer_specs(fn, params, a, b)['w'].bias is None


@pytest.mark.parametrize('fn, reason', [
    (lambda p, x: x @ (p['w'] / jnp.linalg.norm(p['w'], axis=0,
                                                keepdims=True)),
     'transformed before its dot_general'),
    (lambda p, x: x @ (p['w'] * p['b'][None, :]),
     'transformed before its dot_general'),
    (lambda p, x: x @ (p['w'].T @ p['w']), 'both operands'),
    (lambda p, x: (x @ p['w']) @ (p['w'].T @ p['w']), 'both operands'),
    (lambda p, x: lax.cond(x.sum() > 0, lambda: x @ p['w'],
                           lambda: x @ p['w'] * 2), 'inside a cond'),
    (lambda p, x: lax.conv_general_dilated(
        p['w'][None, None], x[:, None, :, None], (1, 1), 'VALID'),
     'lhs'),
    # A tied embedding: looked up as a table, then the output kernel.
    (lambda p, x: p['w'][jnp.argmax(x, axis=1)] @ p['w'].T,
     'also used outside its dense/conv layers'),
    (lambda p, x: x @ p['w'] + jnp.sum(p['w'] ** 2),
     'also used outside its dense/conv layers'),
    (lambda p, x: x @ p['w'][:, :2], 'indexed or sliced'),
])
def test_parameters_that_are_not_layers_pass_through_with_a_reason(
    fn, reason):
  params = {'w': jnp.ones((3, 3)), 'b': jnp.ones(3)}
  x = jnp.ones((4, 3))
  described = tracing.describe(fn, params, x)
  assert reason in described['w'], described
  assert 'w' not in tracing.layer_specs(fn, params, x)
  _, stats = tracing.apply(fn, params, x)
  assert 'w' not in stats


def test_attention_between_activations_is_not_a_layer():
  def fn(p, x):
    q = x @ p['q']
    return jax.nn.softmax(q @ x.T) @ x  # activation x activation

  params = {'q': jnp.ones((3, 3))}
  assert tracing.describe(fn, params, jnp.ones((4, 3))) == {
      'q': 'dense kernel'}


def test_custom_jvp_around_a_layer_is_reported():
  @jax.custom_jvp
  def layer(w, x):
    return x @ w

  layer.defjvp(lambda primals, tangents: (
      layer(*primals), primals[1] @ tangents[0] + tangents[1] @ primals[0]))
  described = tracing.describe(lambda p, x: layer(p['w'], x),
                               {'w': jnp.ones((3, 2))}, jnp.ones((4, 3)))
  assert 'inside a custom_jvp_call' in described['w']


def test_core_with_leaf_layers_keeps_unlisted_leaves_and_checks_paths():
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros((2, 1)), 's': jnp.ones(2)}
  specs = tracing.layer_specs(
      lambda p, x: (x @ p['w'] + p['b'][:, 0][None]) * p['s'][None], params,
      jnp.ones((4, 3)))
  assert bnp_optax.describe_coverage(params, layer_specs=specs) == {
      'b': 'dense bias', 's': 'pass-through', 'w': 'dense kernel'}
  with pytest.raises(ValueError, match='not in the parameters'):
    bnp_optax.scale_by_bnp(layer_specs={'x': specs['w']}).init(params)
  with pytest.raises(ValueError, match='bias of several layers'):
    bnp_optax.scale_by_bnp(layer_specs={
        'w': specs['w'], 's': bnp_optax.LeafLayer(specs['w'].spec, 'b'),
    }).init({**params, 's': jnp.ones((3, 2))})
  with pytest.raises(TypeError, match='mixes LeafLayer'):
    bnp_optax.scale_by_bnp(
        layer_specs={**specs, 's': bnp_optax._src.layout.DENSE}
    ).init(params)
  # Statistics from tracing without layer_specs: a pointed error.
  tx = bnp_optax.scale_by_bnp()
  _, stats = tracing.apply(lambda p, x: x @ p['w'], params, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match='tracing.layer_specs'):
    tx.update(params, tx.init(params), layer_stats=stats)


def test_masked_leaf_layers():
  params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2), 'v': jnp.ones((2, 2))}
  fn = lambda p, x: (x @ p['w'] + p['b'][None]) @ p['v']
  x = jnp.ones((4, 3))
  specs = tracing.layer_specs(fn, params, x)
  tx = optax.masked(bnp_optax.scale_by_bnp(layer_specs=specs),
                    {'w': True, 'b': True, 'v': False})
  _, stats = tracing.apply(fn, params, x)
  updates, _ = tx.update(params, tx.init(params), layer_stats=stats)
  _close(updates['v'], params['v'])


def test_package_imports_no_framework():
  code = (
      'import sys, bnp_optax, bnp_optax.tracing\n'
      "bad = {'flax', 'equinox', 'haiku'} & {m.split('.')[0] for m in "
      'sys.modules}\n'
      'assert not bad, bad\n')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_bench_tracing_runs(tmp_path):
  """Smoke test of benchmarks/bench_tracing.py; nothing about time."""
  root = pathlib.Path(__file__).resolve().parent.parent
  out = tmp_path / 'r.json'
  env = dict(os.environ, JAX_NUMPY_RANK_PROMOTION='raise',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-W', 'error', str(root / 'benchmarks' /
                                          'bench_tracing.py'),
       '--cases', 'fc60', '--steps', '2', '--warmup', '1',
       '--compile-reps', '1', '--out', str(out)],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (result,) = json.loads(out.read_text())['results']
  for v in result['variants'].values():
    assert v['jit_cache_size'] == 1 and v['median_ms'] > 0
  assert result['tracing/linen']['step'] > 0


def _loop_model(kind):
  """A shared kernel ``w`` applied ``n`` times by a JAX loop, after ``w_in``."""

  def fn(p, x, n):
    h = jnp.tanh(x @ p['w_in'])
    step = lambda h: jnp.tanh(h @ p['w'] + p['b'][None, :])
    if kind == 'scan':
      h = lax.scan(lambda h, _: (step(h), None), h, None, length=n)[0]
    elif kind == 'fori_loop':  # static bounds: lowered to a scan
      h = lax.fori_loop(0, n, lambda i, h: step(h), h)
    else:  # lax.map over n copies of the batch
      hs = lax.map(step, jnp.broadcast_to(h, (n,) + h.shape))
      h = h + jnp.sum(hs, axis=0)
    return jnp.sum(h, axis=1)

  def unrolled_inputs(p, x, n):
    h = jnp.tanh(x @ p['w_in'])
    if kind == 'map':
      return [h] * n
    inputs = []
    for _ in range(n):
      inputs.append(h)
      h = jnp.tanh(h @ p['w'] + p['b'][None, :])
    return inputs

  return fn, unrolled_inputs


@pytest.mark.parametrize('kind', ['scan', 'fori_loop', 'map'])
def test_shared_kernel_in_a_loop_merges_steps_and_an_empty_loop_has_no_data(
    kind):
  fn, unrolled_inputs = _loop_model(kind)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {'w_in': jnp.asarray(rng.standard_normal((3, 4))),
              'w': jnp.asarray(rng.standard_normal((4, 4))) / 2,
              'b': jnp.asarray(rng.standard_normal(4))}
    x = jnp.asarray(models.badly_scaled_inputs(rng, (5, 3)))
    specs = tracing.layer_specs(fn, params, x, 3)
    assert set(specs) == {'w_in', 'w'}
    # Static loops of 3 steps: the steps' inputs merged exactly.
    _, stats = tracing.apply(fn, params, x, 3)
    rows = np.concatenate(unrolled_inputs(params, x, 3))
    np.testing.assert_allclose(stats['w'].mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats['w'].variance, rows.var(0), rtol=1e-12)
    assert float(stats['w'].batch_size) == 15
    # No steps: the shared layer has no data this pass. Its running
    # statistics and its (zero) gradient stay as they are; no NaN.
    tx = bnp_optax.scale_by_bnp(rho=0.5, layer_specs=specs)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x):
      def loss(p):
        y, layer_stats = tracing.apply(fn, p, x, 0)
        return jnp.sum(jnp.sin(y)), layer_stats
      grads, layer_stats = jax.grad(loss, has_aux=True)(params)
      updates, state = tx.update(grads, state, params,
                                 layer_stats=layer_stats)
      return grads, updates, state, layer_stats

    grads, updates, new_state, stats = step(params, state, x)
    assert float(stats['w'].count) == 0
    for leaf in ('w', 'b'):
      np.testing.assert_array_equal(updates[leaf], grads[leaf])
      np.testing.assert_array_equal(grads[leaf], 0)
    jax.tree.map(np.testing.assert_array_equal,
                 new_state.running_stats['w'], state.running_stats['w'])
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    assert not np.allclose(updates['w_in'], grads['w_in'])  # preconditioned


@pytest.mark.parametrize('route', ['layer_specs', 'apply', 'describe'])
def test_colliding_leaf_names_are_an_error_naming_both(route):
  params = {'a/w': jnp.ones((3, 2)), 'a': {'w': jnp.ones((2, 2))}}
  fn = lambda p, x: (x @ p['a/w']) @ p['a']['w']
  with pytest.raises(ValueError, match=re.escape(
      "the parameters ['a']['w'] and ['a/w'] are both named 'a/w'")):
    getattr(tracing, route)(fn, params, jnp.ones((4, 3)))


def test_fori_loop_roles_as_the_how_to_states_them():
  params = {'v': jnp.ones((4, 4)), 'w': jnp.ones((3, 4, 4))}
  x, n = jnp.ones((5, 4)), jnp.int32(3)
  shared = lambda p, x, n: lax.fori_loop(
      0, 3, lambda i, h: jnp.tanh(h @ p['v']), x)
  indexed = lambda p, x, n: lax.fori_loop(
      0, 3, lambda i, h: jnp.tanh(h @ p['w'][i]), x)
  traced = lambda p, x, n: lax.fori_loop(
      0, n, lambda i, h: jnp.tanh(h @ p['v']), x)
  assert tracing.describe(shared, params, x, n)['v'] == 'dense kernel'
  assert tracing.describe(indexed, params, x, n)['w'].startswith(
      'pass-through: indexed or sliced before use')
  assert tracing.describe(traced, params, x, n)['v'].startswith(
      'pass-through: used as a kernel inside a while')
