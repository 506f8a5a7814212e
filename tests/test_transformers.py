"""BNP on Transformer blocks: attention projections captured exactly.

One pre-LayerNorm Transformer block (LayerNorm, multi-head self-attention,
LayerNorm, GELU MLP, residuals) is written four ways with the same weights:
Flax linen (``nn.MultiHeadDotProductAttention``), Flax NNX
(``nnx.MultiHeadAttention``), Equinox (``eqx.nn.MultiheadAttention``,
captured by tracing) and Haiku (``hk.MultiHeadAttention``, by tracing). The
reference is the same computation unrolled into plain ``nn.Dense`` layers on
``(B*T, n)`` rows, whose kernels are 2-D: every projection's statistics over
batch x tokens and one BNP step of each route must equal the unrolled
model's (float64), and the statistics equal a NumPy oracle of the rows.
"""

import math

import equinox as eqx
from flax import nnx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnp_optax
from bnp_optax import tracing

B, T, N, H, D, M = 3, 5, 8, 2, 4, 16  # batch, tokens, width, heads, head dim
EPS = 1e-6  # LayerNorm epsilon, set alike in every framework
PROJECTIONS = ('query', 'key', 'value', 'out', 'mlp1', 'mlp2')
_LR = 0.1


def _canonical_weights(seed=0):
  """The block's weights as the unrolled model holds them (2-D kernels)."""
  rng = np.random.default_rng(seed)
  w = lambda *shape: rng.standard_normal(shape) / math.sqrt(shape[0])
  b = lambda n: 0.3 * rng.standard_normal(n)
  params = {name: {'kernel': w(N, H * D), 'bias': b(H * D)}
            for name in ('query', 'key', 'value')}
  params['out'] = {'kernel': w(H * D, N), 'bias': b(N)}
  params['mlp1'] = {'kernel': w(N, M), 'bias': b(M)}
  params['mlp2'] = {'kernel': w(M, N), 'bias': b(N)}
  for name in ('ln1', 'ln2'):
    params[name] = {'scale': 1 + 0.2 * rng.standard_normal(N),
                    'bias': 0.2 * rng.standard_normal(N)}
  return params


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  # Not centred and badly scaled, as BNP's inputs are in practice.
  x = 2.0 + rng.standard_normal((B, T, N)) * np.linspace(0.5, 3.0, N)
  target = rng.standard_normal((B, T, N))
  return x, target


# ------------------------------------------------ the NumPy oracle of rows


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * p['scale'] + p['bias']


def _gelu(x):  # the tanh approximation, jax.nn.gelu's default
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _oracle_rows(params, x):
  """The input rows ``(B*T, fan-in)`` of every projection, in NumPy."""
  rows = x.reshape(B * T, N)
  h = _layer_norm(rows, params['ln1'])
  heads = {}
  for name in ('query', 'key', 'value'):
    y = h @ params[name]['kernel'] + params[name]['bias']
    heads[name] = y.reshape(B, T, H, D)
  logits = np.einsum('bqhd,bkhd->bhqk', heads['query'] / np.sqrt(D),
                     heads['key'])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  o = np.einsum('bhqk,bkhd->bqhd', weights, heads['value']).reshape(
      B * T, H * D)
  x1 = rows + o @ params['out']['kernel'] + params['out']['bias']
  h2 = _layer_norm(x1, params['ln2'])
  g = _gelu(h2 @ params['mlp1']['kernel'] + params['mlp1']['bias'])
  return {'query': h, 'key': h, 'value': h, 'out': o, 'mlp1': h2, 'mlp2': g}


# ---------------------------------------------------- the unrolled reference


class Unrolled(nn.Module):
  """The block as plain ``nn.Dense`` layers on ``(B*T, n)`` rows."""

  @nn.compact
  def __call__(self, x):
    b, t, n = x.shape
    rows = x.reshape(b * t, n)
    h = nn.LayerNorm(epsilon=EPS, name='ln1')(rows)
    q, k, v = (nn.Dense(H * D, name=name)(h).reshape(b, t, H, D)
               for name in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q / math.sqrt(D), k)
    o = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits), v)
    x1 = rows + nn.Dense(n, name='out')(o.reshape(b * t, H * D))
    h2 = nn.LayerNorm(epsilon=EPS, name='ln2')(x1)
    g = jax.nn.gelu(nn.Dense(M, name='mlp1')(h2))
    return (x1 + nn.Dense(n, name='mlp2')(g)).reshape(b, t, n)


def _unrolled_route(params):
  model = Unrolled()
  return (lambda p, x: bnp_optax.linen.apply(model, {'params': p}, x),
          params, None)


# ------------------------------------------------------------ four routes


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=EPS, name='ln1')(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=H, qkv_features=H * D, out_features=N, deterministic=True,
        name='attention')(h)
    h = nn.LayerNorm(epsilon=EPS, name='ln2')(x)
    g = jax.nn.gelu(nn.Dense(M, name='mlp1')(h))
    return x + nn.Dense(N, name='mlp2')(g)


def _flax_attention_params(c):
  """Canonical 2-D kernels as Flax's DenseGeneral kernels ``(n, H, D)``."""
  attention = {name: {'kernel': c[name]['kernel'].reshape(N, H, D),
                      'bias': c[name]['bias'].reshape(H, D)}
               for name in ('query', 'key', 'value')}
  attention['out'] = {'kernel': c['out']['kernel'].reshape(H, D, N),
                      'bias': c['out']['bias']}
  return attention


def _from_flax(p):
  """A linen/NNX block's parameters (or statistics) in canonical form."""
  a = p['attention']
  out = {name: {'kernel': a[name]['kernel'].reshape(N, H * D),
                'bias': a[name]['bias'].reshape(H * D)}
         for name in ('query', 'key', 'value')}
  out['out'] = {'kernel': a['out']['kernel'].reshape(H * D, N),
                'bias': a['out']['bias']}
  for name in ('mlp1', 'mlp2', 'ln1', 'ln2'):
    out[name] = dict(p[name])
  return out


def _linen_route(c):
  model = LinenBlock()
  params = {'attention': _flax_attention_params(c),
            **{k: c[k] for k in ('mlp1', 'mlp2', 'ln1', 'ln2')}}
  x = jnp.zeros((B, T, N))
  specs = bnp_optax.linen.layer_specs(model, {'params': params}, x)
  return (lambda p, x: bnp_optax.linen.apply(model, {'params': p}, x),
          params, specs)


def _einsum_attention(query, key, value, **kwargs):
  """Attention as the unrolled model computes it, in the inputs' dtype.

  NNX's default calls ``jax.nn.dot_product_attention``, whose softmax runs
  in float32 even on float64 inputs (an error of ~1e-8 downstream, not a
  capture error); the test compares capture at float64.
  """
  del kwargs
  logits = jnp.einsum('...qhd,...khd->...hqk', query / math.sqrt(D), key)
  return jnp.einsum('...hqk,...khd->...qhd', jax.nn.softmax(logits), value)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(N, epsilon=EPS, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=H, in_features=N, qkv_features=H * D, out_features=N,
        decode=False, deterministic=True, attention_fn=_einsum_attention,
        rngs=rngs)
    self.ln2 = nnx.LayerNorm(N, epsilon=EPS, rngs=rngs)
    self.mlp1 = nnx.Linear(N, M, rngs=rngs)
    self.mlp2 = nnx.Linear(M, N, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.ln1(x))
    return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x))))


def _nnx_route(c):
  model = NNXBlock(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  params = {'attention': _flax_attention_params(c),
            **{k: c[k] for k in ('mlp1', 'mlp2', 'ln1', 'ln2')}}
  expected = jax.tree.map(lambda p: p.shape, nnx.to_pure_dict(state))
  assert jax.tree.map(lambda p: p.shape, params) == expected
  specs = bnp_optax.nnx.layer_specs(model)

  def fn(p, x):
    return bnp_optax.nnx.apply(nnx.merge(graphdef, p), x)

  return fn, params, specs


class EqxBlock(eqx.Module):
  ln1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  ln2: eqx.nn.LayerNorm
  mlp1: eqx.nn.Linear
  mlp2: eqx.nn.Linear

  def __init__(self, key):
    k0, k1, k2 = jax.random.split(key, 3)
    self.ln1 = eqx.nn.LayerNorm(N, eps=EPS)
    self.attention = eqx.nn.MultiheadAttention(
        H, N, qk_size=D, vo_size=D, use_query_bias=True, use_key_bias=True,
        use_value_bias=True, use_output_bias=True, key=k0)
    self.ln2 = eqx.nn.LayerNorm(N, eps=EPS)
    self.mlp1 = eqx.nn.Linear(N, M, key=k1)
    self.mlp2 = eqx.nn.Linear(M, N, key=k2)

  def __call__(self, x):  # one sequence (T, n)
    h = jax.vmap(self.ln1)(x)
    x = x + self.attention(h, h, h)
    h = jax.vmap(self.ln2)(x)
    return x + jax.vmap(lambda r: self.mlp2(jax.nn.gelu(self.mlp1(r))))(h)


_EQX_NAMES = {'query': 'query_proj', 'key': 'key_proj',
              'value': 'value_proj', 'out': 'output_proj'}


def _equinox_route(c):
  block = EqxBlock(jax.random.key(0))
  a = block.attention
  leaves = []
  for name, attr in _EQX_NAMES.items():
    leaves += [(getattr(a, attr).weight, c[name]['kernel'].T),
               (getattr(a, attr).bias, c[name]['bias'])]
  for name in ('mlp1', 'mlp2'):
    layer = getattr(block, name)
    leaves += [(layer.weight, c[name]['kernel'].T),
               (layer.bias, c[name]['bias'])]
  for name in ('ln1', 'ln2'):
    layer = getattr(block, name)
    leaves += [(layer.weight, c[name]['scale']), (layer.bias, c[name]['bias'])]
  ids = {id(old): jnp.asarray(new) for old, new in leaves}
  block = jax.tree.map(lambda leaf: ids.get(id(leaf), leaf), block)
  params, static = eqx.partition(block, eqx.is_array)
  fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  specs = tracing.layer_specs(fn, params, jnp.zeros((B, T, N)))
  return (lambda p, x: tracing.apply(fn, p, x)), params, specs


def _from_equinox(p):
  a = p.attention
  out = {}
  for name, attr in _EQX_NAMES.items():
    out[name] = {'kernel': getattr(a, attr).weight.T,
                 'bias': getattr(a, attr).bias}
  for name in ('mlp1', 'mlp2'):
    out[name] = {'kernel': getattr(p, name).weight.T,
                 'bias': getattr(p, name).bias}
  for name in ('ln1', 'ln2'):
    out[name] = {'scale': getattr(p, name).weight,
                 'bias': getattr(p, name).bias}
  return out


def _haiku_block(x):
  ln = lambda name: hk.LayerNorm(-1, True, True, eps=EPS, name=name)
  h = ln('ln1')(x)
  x = x + hk.MultiHeadAttention(
      num_heads=H, key_size=D, model_size=N,
      w_init=hk.initializers.VarianceScaling(1.0), name='attention')(h, h, h)
  h = ln('ln2')(x)
  g = jax.nn.gelu(hk.Linear(M, name='mlp1')(h))
  return x + hk.Linear(N, name='mlp2')(g)


_HK_NAMES = {'query': 'attention/query', 'key': 'attention/key',
             'value': 'attention/value', 'out': 'attention/linear'}


def _haiku_route(c):
  model = hk.without_apply_rng(hk.transform(_haiku_block))
  init = model.init(jax.random.key(0), jnp.zeros((B, T, N)))
  params = {}
  for name, module in _HK_NAMES.items():
    params[module] = {'w': c[name]['kernel'], 'b': c[name]['bias']}
  for name in ('mlp1', 'mlp2'):
    params[name] = {'w': c[name]['kernel'], 'b': c[name]['bias']}
  for name in ('ln1', 'ln2'):
    params[name] = {'scale': c[name]['scale'], 'offset': c[name]['bias']}
  assert (jax.tree.map(lambda p: p.shape, params)
          == jax.tree.map(lambda p: p.shape, init))
  specs = tracing.layer_specs(model.apply, params, jnp.zeros((B, T, N)))
  return (lambda p, x: tracing.apply(model.apply, p, x)), params, specs


def _from_haiku(p):
  out = {}
  for name, module in {**_HK_NAMES, 'mlp1': 'mlp1', 'mlp2': 'mlp2'}.items():
    out[name] = {'kernel': p[module]['w'], 'bias': p[module]['b']}
  for name in ('ln1', 'ln2'):
    out[name] = {'scale': p[name]['scale'], 'bias': p[name]['offset']}
  return out


def _stats_from_flax(stats):
  out = {name: stats['attention'][name] for name in ('query', 'key', 'value',
                                                       'out')}
  out.update(mlp1=stats['mlp1'], mlp2=stats['mlp2'])
  return out


ROUTES = {
    'linen': (_linen_route, _from_flax),
    'nnx': (_nnx_route, _from_flax),
    'equinox': (_equinox_route, _from_equinox),
    'haiku': (_haiku_route, _from_haiku),
}


# Where each route's statistics of each projection are.
_STAT_PATHS = {
    'unrolled': {name: name for name in PROJECTIONS},
    'linen': {**{n: f'attention/{n}' for n in ('query', 'key', 'value',
                                                'out')},
              'mlp1': 'mlp1', 'mlp2': 'mlp2'},
    'equinox': {**{n: f'attention/{a}/weight' for n, a in _EQX_NAMES.items()},
                'mlp1': 'mlp1/weight', 'mlp2': 'mlp2/weight'},
    'haiku': {**{n: f'{m}/w' for n, m in _HK_NAMES.items()},
              'mlp1': 'mlp1/w', 'mlp2': 'mlp2/w'},
}
_STAT_PATHS['nnx'] = _STAT_PATHS['linen']


def _flat_stats(stats, route):
  """``{projection: LayerStats}`` of a route's statistics; none missing."""
  flat = {}

  def visit(path, node):
    if isinstance(node, bnp_optax.LayerStats):
      flat['/'.join(path)] = node
    else:
      for k, v in node.items():
        visit(path + (str(k),), v)

  visit((), stats)
  paths = _STAT_PATHS[route]
  assert sorted(flat) == sorted(paths.values()), sorted(flat)
  return {name: flat[path] for name, path in paths.items()}


def _step(fn, params, specs, x, target):
  """Statistics and one BNP + SGD step of ``fn`` under jit."""
  tx = bnp_optax.bnp(_LR, layer_specs=specs)

  @jax.jit
  def step(params, x):
    def loss(p):
      y, stats = fn(p, x)
      return jnp.sum(y * target), stats

    grads, stats = jax.grad(loss, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    return stats, optax.apply_updates(params, updates)

  return step(params, x)


def _close(a, b, tol=1e-10):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                             atol=tol)


@pytest.fixture(scope='module')
def reference():
  with jax.enable_x64(True):
    c = _canonical_weights()
    x, target = _inputs()
    fn, params, specs = _unrolled_route(
        jax.tree.map(jnp.asarray, c))
    stats, new_params = _step(fn, params, specs, jnp.asarray(x),
                              jnp.asarray(target))
    return (c, x, target, _flat_stats(stats, 'unrolled'),
            jax.device_get(new_params))


def test_unrolled_statistics_match_numpy_rows(reference):
  c, x, _, stats, _ = reference
  rows = _oracle_rows(c, x)
  assert set(stats) == set(PROJECTIONS)
  for name in PROJECTIONS:
    _close(stats[name].mean, rows[name].mean(0))
    _close(stats[name].variance, rows[name].var(0))
    assert float(stats[name].count) == B * T
    assert float(stats[name].batch_size) == B * T


@pytest.mark.parametrize('route', list(ROUTES))
def test_block_statistics_and_step_equal_the_unrolled_dense_model(
    route, reference):
  c, x, target, ref_stats, ref_params = reference
  make, to_canonical = ROUTES[route]
  with jax.enable_x64(True):
    fn, params, specs = make(jax.tree.map(jnp.asarray, c))
    assert jax.tree.leaves(params)[0].dtype == jnp.float64
    stats, new_params = _step(fn, params, specs, jnp.asarray(x),
                              jnp.asarray(target))
  stats = _flat_stats(stats, route)
  for name in PROJECTIONS:
    # Fan-in flattened: the output projection's (H, D) is the unrolled
    # layer's H * D inputs, in the same order.
    _close(np.ravel(stats[name].mean), ref_stats[name].mean)
    _close(np.ravel(stats[name].variance), ref_stats[name].variance)
    assert float(stats[name].count) == B * T
    assert float(stats[name].batch_size) == B * T
    assert float(stats[name].positions) == 1
  new_params = to_canonical(jax.device_get(new_params))
  for name in ref_params:
    for leaf in ref_params[name]:
      _close(new_params[name][leaf], ref_params[name][leaf])
  # The step moved the projections (BNP, not a no-op) and the
  # LayerNorm parameters by plain SGD.
  assert not np.allclose(ref_params['out']['kernel'], c['out']['kernel'])


@pytest.mark.parametrize('route', list(ROUTES))
def test_describe_lists_every_projection(route):
  with jax.enable_x64(True):
    fn, params, specs = ROUTES[route][0](
        jax.tree.map(jnp.asarray, _canonical_weights()))
    x = jnp.zeros((B, T, N))
    if route in ('equinox', 'haiku'):
      roles = bnp_optax.describe_coverage(params, layer_specs=specs)
    else:
      _, stats = fn(params, x)
      roles = bnp_optax.describe_coverage(params, stats, layer_specs=specs)
  kernels = sorted(k for k, v in roles.items() if v == 'dense kernel')
  biases = sorted(k for k, v in roles.items() if v == 'dense bias')
  passed = sorted(k for k, v in roles.items() if v == 'pass-through')
  assert len(kernels) == len(biases) == len(PROJECTIONS), roles
  # Only the two LayerNorms' scales and offsets pass through.
  assert len(passed) == 4 and all('ln' in k for k in passed), roles
  assert len(roles) == 2 * len(PROJECTIONS) + 4
