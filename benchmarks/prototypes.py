"""Prototype BNP implementations, to measure changes to the core side by side.

Self-contained (no ``bnp_optax`` import outside the ``core_*`` variants),
so that it measures the same thing while the core changes. It handles what
the benchmark networks need:
Flax ``Dense`` and ``Conv`` layers with Flax kernel layouts (``(n_in,
n_out)``, ``(*window, c_in, c_out)``). ``proto_base`` is a line-by-line copy
of the algorithm of the core at commit 23ebe53 (statistics shifted by the
first row, per-layer update with a broadcast-multiply-sum for the bias
correction, two finiteness reductions per layer); each other variant changes
one or a few things:

- ``matvec``: the bias correction ``sum_j mu_j G_w'[j, i]`` as a dot
  (``(mu / s) @ G_w - G_b * sum(mu^2 / s)``, with the kernel reshaped to
  ``(fan_in, n_out)``), instead of broadcasting ``mu`` to the kernel's shape,
  multiplying and reducing: no kernel-sized temporaries, and ``G_w'`` itself
  fuses into the parameter update;
- ``matvec2``: the same correction as a dot on the new kernel gradient,
  ``mu @ G_w'`` (``G_w'`` is then materialised for the dot);
- ``finite1``: one reduction for the "statistics are finite" guard
  (``all(isfinite(mean) & isfinite(variance))``), not two;
- ``finite_elem``: the guard per feature (``where(isfinite(m) &
  isfinite(v), new, old)`` elementwise), which fuses into the running-average
  update: no reduction at all;
- ``nofinite``: no guard at all (to see what it costs; not a proposal);
- ``plainstats``: sum and sum of squares without the first-row shift
  (numerically worse, to see what the shift costs; not a proposal);
- ``twopass``: the statistics as the core computes them from commit 48700d9
  on (the mean, then the mean squared deviation from it);
- ``fused_variadic``, ``fused_dot``, ``fused_plain``, ``fused_twopass``:
  ``bnp_fused`` with the shifted sums as one variadic ``lax.reduce``, as
  contractions (``ones @ c``, ``einsum('ni,ni->i', c, c)``), unshifted, or
  two-pass;
- ``packed``: the running statistics of all layers in two flat vectors (the
  optimizer state has 3 leaves instead of ``2 L + 1``), to see the per-leaf
  dispatch cost at batch 1;
- ``stats_only``: SGD plus the forward statistics (kept in the state) and
  no preconditioning, to split BNP's cost into statistics and update;
- ``bnp_fused`` = ``matvec`` + ``finite1``; ``bnp_lean`` = ``matvec2`` +
  ``finite_elem``; ``proposed`` = ``matvec`` + ``finite_elem`` + the core's
  two-pass statistics: the changes recommended for the core;
- ``vectorised``: all layers' small-vector work at once on a packed state;
- ``grouped_stats_only``, ``grouped_vectorised``: the inputs of all layers
  with the same number of rows concatenated and reduced together;
- ``dot2pass_stats_only``, ``dot2pass_vectorised``: two-pass statistics
  with the column sums as GEMVs with ones;
- ``core_reduce_stats``, ``core_gemv_few_rows``, ``core_gemv_mean_only``:
  the committed core traced with another ``statistics._column_sums``
  (reductions only; GEMV up to 128 rows, which the core now does; GEMV for
  the mean only), to measure the core's choice side by side.

Apart from the ``core_*`` variants this module does not import
``bnp_optax``.
"""

from collections.abc import Mapping
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

COLLECTION = 'bnp_proto_stats'
EPS1, EPS2, RHO = 1e-2, 1e-4, 0.99


class Stats(NamedTuple):
  mean: jax.Array
  variance: jax.Array
  count: jax.Array
  batch_size: jax.Array
  positions: jax.Array


# ------------------------------------------------------------ statistics


def stats_shifted(x, num_batch_axes, positions):
  """As the core at 23ebe53: one pass, shifted by the first row."""
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  shift = rows[0]
  centred = rows - shift[None, :]
  mean_c = jnp.mean(centred, axis=0)
  var = jnp.maximum(jnp.mean(jnp.square(centred), axis=0) - mean_c**2, 0)
  return _stats(x, rows, shift + mean_c, var, num_batch_axes, positions)


def stats_twopass(x, num_batch_axes, positions):
  """As the core from 48700d9 on: the mean, then the mean squared deviation."""
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  mean = jnp.mean(rows, axis=0)
  var = jnp.mean(jnp.square(rows - mean[None, :]), axis=0)
  return _stats(x, rows, mean, var, num_batch_axes, positions)


def stats_plain(x, num_batch_axes, positions):
  """Sum and sum of squares, no shift (loses precision for large means)."""
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  mean = jnp.mean(rows, axis=0)
  var = jnp.maximum(jnp.mean(jnp.square(rows), axis=0) - mean**2, 0)
  return _stats(x, rows, mean, var, num_batch_axes, positions)


def stats_variadic(x, num_batch_axes, positions):
  """Shifted sum and sum of squares in one variadic ``lax.reduce``."""
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  shift = rows[0]
  centred = rows - shift[None, :]
  zero = jnp.zeros((), jnp.float32)
  s1, s2 = lax.reduce(
      (centred, jnp.square(centred)), (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,))
  n = rows.shape[0]
  mean_c = s1 / n
  var = jnp.maximum(s2 / n - mean_c**2, 0)
  return _stats(x, rows, shift + mean_c, var, num_batch_axes, positions)


def stats_welford(x, num_batch_axes, positions):
  """One variadic reduction of (count, mean, M2), merged as Chan et al.

  One pass, no shift and no slice of the batch (so a sharded batch is fine),
  and as stable as the two-pass formula: each partial result carries its
  own mean.
  """
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])

  def merge(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    w = jnp.where(n > 0, nb / jnp.where(n > 0, n, 1), 0)
    return n, ma + delta * w, sa + sb + delta * delta * na * w

  zero = jnp.zeros((), jnp.float32)
  n, mean, m2 = lax.reduce(
      (jnp.ones_like(rows), rows, jnp.zeros_like(rows)), (zero, zero, zero),
      merge, (0,))
  var = jnp.maximum(m2 / n, 0)
  return _stats(x, rows, mean, var, num_batch_axes, positions)


def stats_dot(x, num_batch_axes, positions):
  """Shifted sums as contractions: ``ones @ c`` and ``einsum(c, c)``."""
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  shift = rows[0]
  centred = rows - shift[None, :]
  n = rows.shape[0]
  mean_c = jnp.ones((n,), jnp.float32) @ centred / n
  var = jnp.maximum(
      jnp.einsum('ni,ni->i', centred, centred) / n - mean_c**2, 0)
  return _stats(x, rows, shift + mean_c, var, num_batch_axes, positions)


def _stats(x, rows, mean, var, num_batch_axes, positions):
  f = lambda v: jnp.asarray(v, jnp.float32)
  return Stats(mean, var, f(rows.shape[0]),
               f(math.prod(x.shape[:num_batch_axes])), f(positions))


def _intercept(record):
  """A method interceptor calling ``record(module, x, nb, positions)``.

  ``nb`` is the number of batch axes of the layer input ``x``, ``positions``
  the output positions per example (1 for Dense).
  """

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(
        module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs['inputs']
    y = next_fun(*args, **kwargs)
    if module.is_initializing():
      return y
    if isinstance(module, nn.Dense):
      record(module, x, x.ndim - 1, 1)
    else:
      nsp = len(module.kernel_size)
      positions = math.prod(y.shape[y.ndim - nsp - 1:-1])
      record(module, x, x.ndim - nsp - 1, positions)
    return y

  return intercept


def make_apply(stats_fn):
  """``apply(model, variables, x) -> (y, stats)``, stats like the params."""

  intercept = _intercept(lambda module, x, nb, positions: module.sow(
      COLLECTION, 'stats', stats_fn(x, nb, positions)))

  def collect(tree):
    if 'stats' in tree:
      (s,) = tree['stats']  # the benchmark networks share no layer
      return s
    return {k: collect(v) for k, v in tree.items()}

  def apply(model, variables, x):
    with nn.intercept_methods(intercept):
      y, mutated = model.apply(variables, x, mutable=[COLLECTION])
    return y, collect(mutated[COLLECTION])

  return apply


# ------------------------------------------------------------ transform


class Running(NamedTuple):
  mean: jax.Array
  variance: jax.Array


class ProtoState(NamedTuple):
  count: jax.Array
  running: Any  # {path: Running}, or Running of flat vectors ('packed')


def _layers(tree, prefix=()):
  """Yields (path, layer dict) for every mapping with a kernel."""
  if isinstance(tree, Mapping):
    if 'kernel' in tree and getattr(tree['kernel'], 'ndim', 0) >= 2:
      yield '/'.join(prefix), tree
      return
    for k, v in tree.items():
      yield from _layers(v, prefix + (k,))


def _get(tree, path):
  for k in path.split('/') if path else ():
    tree = tree[k]
  return tree


def _update_running(run, batch, finite_mode):
  bm, bv = batch.mean, batch.variance
  bv = jnp.where(batch.count == 1, bv + jnp.square(bm - run.mean), bv)
  mean = RHO * run.mean + (1 - RHO) * bm
  var = RHO * run.variance + (1 - RHO) * bv
  if finite_mode == 'none':
    return Running(mean, var)
  if finite_mode == 'elementwise':  # per feature: fuses, no reduction
    ok = jnp.isfinite(bm) & jnp.isfinite(bv)
    return Running(jnp.where(ok, mean, run.mean),
                   jnp.where(ok, var, run.variance))
  if finite_mode == 'one':
    finite = jnp.all(jnp.isfinite(bm) & jnp.isfinite(bv))
  else:
    finite = jnp.all(jnp.isfinite(bm)) & jnp.all(jnp.isfinite(bv))
  return Running(jnp.where(finite, mean, run.mean),
                 jnp.where(finite, var, run.variance))


def _precondition(g_w, g_b, run, batch, matvec):
  """Steps 3-5 for a Flax Dense/Conv kernel (fan-in on axis -2)."""
  n_in = math.prod(g_w.shape[:-1])
  reg = run.variance + EPS1 * jnp.max(run.variance) + EPS2
  q2 = jnp.maximum(n_in / batch.batch_size, jnp.sqrt(batch.positions))
  inv = 1 / (reg * q2)
  if not matvec:  # as the core: broadcast, multiply, reduce
    shape = [1] * g_w.ndim
    shape[-2] = run.mean.shape[0]
    mean_b, inv_b = run.mean.reshape(shape), inv.reshape(shape)
    new_w = (g_w - mean_b * g_b) * inv_b
    absorbed = jnp.sum(mean_b * new_w, axis=tuple(range(g_w.ndim - 1)))
    return new_w, g_b / q2 - absorbed
  window = math.prod(g_w.shape[:-2])
  if matvec == 'new':  # sum_j mu_j G_w'[j, i] as a dot on the new G_w
    new_w = (g_w - run.mean[:, None] * g_b) * inv[:, None]
    absorbed = jnp.tile(run.mean, window) @ new_w.reshape(-1, g_w.shape[-1])
    return new_w, g_b / q2 - absorbed
  mi = run.mean * inv
  g2 = g_w.reshape(-1, g_w.shape[-1])  # (window * c_in, n_out), free
  absorbed = jnp.tile(mi, window) @ g2 - g_b * (window * jnp.dot(run.mean, mi))
  new_w = (g_w - run.mean[:, None] * g_b) * inv[:, None]
  return new_w, g_b / q2 - absorbed


def scale_by_bnp_proto(*, matvec=False, finite_mode='two', packed=False):
  """BNP as in the core, with the prototype changes switched on or off."""

  def init_fn(params):
    running = {
        path: Running(jnp.zeros(layer['kernel'].shape[-2], jnp.float32),
                      jnp.ones(layer['kernel'].shape[-2], jnp.float32))
        for path, layer in _layers(params)
    }
    if packed:
      running = Running(
          jnp.concatenate([r.mean for r in running.values()]),
          jnp.concatenate([r.variance for r in running.values()]))
    return ProtoState(jnp.zeros([], jnp.int32), running)

  def update_fn(updates, state, params=None, *, layer_stats, **extra):
    del params, extra
    new = jax.tree_util.tree_map(lambda v: v, updates)  # fresh dicts
    new = _thaw(new)
    running_out, offset = {}, 0
    for path, layer in _layers(updates):
      batch = _get(layer_stats, path)
      if packed:
        size = layer['kernel'].shape[-2]
        run = Running(state.running.mean[offset:offset + size],
                      state.running.variance[offset:offset + size])
        offset += size
      else:
        run = state.running[path]
      run = _update_running(run, batch, finite_mode)
      running_out[path] = run
      w, b = _precondition(layer['kernel'], layer['bias'], run, batch, matvec)
      target = _get(new, path)
      target['kernel'], target['bias'] = w, b
    if packed:
      running_out = Running(
          jnp.concatenate([r.mean for r in running_out.values()]),
          jnp.concatenate([r.variance for r in running_out.values()]))
    return new, ProtoState(optax.safe_increment(state.count), running_out)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_bnp_vectorised():
  """All layers' small-vector work at once, on packed running statistics.

  The running statistics of every layer live in two flat vectors (``S =
  sum n_in`` floats each, the same floats as the per-layer state). The
  running-average update, the finiteness guard (per feature), the
  regularised inverse and the bias-correction scalars are computed for all
  layers together (a handful of kernels instead of about ten per layer); the
  per-layer maxima and sums are taken on a ``(L, max n_in)`` padded view. Per
  layer remain only the bias-correction dot ``(mu / s) @ G_w`` and the
  elementwise kernel update, which fuses with the optimizer's.
  """

  def init_fn(params):
    sizes = [layer['kernel'].shape[-2] for _, layer in _layers(params)]
    total = sum(sizes)
    return ProtoState(jnp.zeros([], jnp.int32),
                      Running(jnp.zeros(total, jnp.float32),
                              jnp.ones(total, jnp.float32)))

  def update_fn(updates, state, params=None, *, layer_stats, **extra):
    del params, extra
    layers = list(_layers(updates))
    batches = [_get(layer_stats, path) for path, _ in layers]
    sizes = [layer['kernel'].shape[-2] for _, layer in layers]
    windows = [math.prod(layer['kernel'].shape[:-2]) for _, layer in layers]
    n_max = max(sizes)
    per_feature = lambda values: jnp.concatenate(
        [jnp.broadcast_to(v, (n,)) for v, n in zip(values, sizes)])
    padded = lambda flat, fill: jnp.stack([
        jnp.pad(part, (0, n_max - n), constant_values=fill)
        for part, n in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), sizes)])
    bm = jnp.concatenate([b.mean for b in batches])
    bv = jnp.concatenate([b.variance for b in batches])
    single = per_feature([b.count == 1 for b in batches])
    run = state.running
    bv = jnp.where(single, bv + jnp.square(bm - run.mean), bv)
    ok = jnp.isfinite(bm) & jnp.isfinite(bv)
    mean = jnp.where(ok, RHO * run.mean + (1 - RHO) * bm, run.mean)
    var = jnp.where(ok, RHO * run.variance + (1 - RHO) * bv, run.variance)
    largest = jnp.max(padded(var, 0.0), axis=1)  # (L,)
    q2 = jnp.stack([
        jnp.maximum(w * n / b.batch_size, jnp.sqrt(b.positions))
        for w, n, b in zip(windows, sizes, batches)])
    inv = 1 / ((var + EPS1 * per_feature(list(largest)) + EPS2)
               * per_feature(list(q2)))
    mi = mean * inv
    c = jnp.sum(padded(mean * mi, 0.0), axis=1) * jnp.asarray(
        windows, jnp.float32)  # (L,) = window * sum mu^2 / s
    new = _thaw(updates)
    offset = 0
    for l, ((path, layer), n, w) in enumerate(zip(layers, sizes, windows)):
      g_w, g_b = layer['kernel'], layer['bias']
      m, i_l, mi_l = (v[offset:offset + n] for v in (mean, inv, mi))
      offset += n
      absorbed = jnp.tile(mi_l, w) @ g_w.reshape(-1, g_w.shape[-1])
      target = _get(new, path)
      target['kernel'] = (g_w - m[:, None] * g_b) * i_l[:, None]
      target['bias'] = g_b / q2[l] - (absorbed - g_b * c[l])
    return new, ProtoState(optax.safe_increment(state.count),
                           Running(mean, var))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def store_statistics():
  """Keeps the batch statistics in the state and leaves the gradient alone.

  With SGD after it, the step costs what plain SGD costs plus the forward
  statistics (which the state output keeps alive): ``stats_only`` minus
  ``sgd`` is the price of the statistics, ``proposed`` minus ``stats_only``
  the price of the update.
  """

  def init_fn(params):
    return ProtoState(jnp.zeros([], jnp.int32), {
        path: Running(jnp.zeros(layer['kernel'].shape[-2], jnp.float32),
                      jnp.ones(layer['kernel'].shape[-2], jnp.float32))
        for path, layer in _layers(params)
    })

  def update_fn(updates, state, params=None, *, layer_stats, **extra):
    del params, extra
    running = {path: Running(_get(layer_stats, path).mean,
                             _get(layer_stats, path).variance)
               for path in state.running}
    return updates, ProtoState(optax.safe_increment(state.count), running)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _thaw(tree):
  if isinstance(tree, Mapping):
    return {k: _thaw(v) for k, v in tree.items()}
  return tree


def _tx(lr=1e-3, **kw):
  return lambda: optax.chain(scale_by_bnp_proto(**kw), optax.sgd(lr))


_shifted = make_apply(stats_shifted)

# name -> (apply_fn, make_tx), picked up by bench_step.py
VARIANTS = {
    'proto_base': (_shifted, _tx()),
    'matvec': (_shifted, _tx(matvec=True)),
    'finite1': (_shifted, _tx(finite_mode='one')),
    'nofinite': (_shifted, _tx(finite_mode='none')),
    'plainstats': (make_apply(stats_plain), _tx()),
    'packed': (_shifted, _tx(packed=True)),
    'matvec2': (_shifted, _tx(matvec='new')),
    'finite_elem': (_shifted, _tx(finite_mode='elementwise')),
    'bnp_fused': (_shifted, _tx(matvec=True, finite_mode='one')),
    'fused_variadic': (make_apply(stats_variadic),
                       _tx(matvec=True, finite_mode='one')),
    'fused_dot': (make_apply(stats_dot), _tx(matvec=True, finite_mode='one')),
    'fused_plain': (make_apply(stats_plain),
                    _tx(matvec=True, finite_mode='one')),
    'twopass': (make_apply(stats_twopass), _tx()),
    'fused_twopass': (make_apply(stats_twopass),
                      _tx(matvec=True, finite_mode='one')),
    'proposed': (make_apply(stats_twopass),
                 _tx(matvec=True, finite_mode='elementwise')),
    'stats_only': (make_apply(stats_twopass),
                   lambda: optax.chain(store_statistics(), optax.sgd(1e-3))),
    'vectorised': (make_apply(stats_twopass),
                   lambda: optax.chain(scale_by_bnp_vectorised(),
                                       optax.sgd(1e-3))),
    'vec_variadic': (make_apply(stats_variadic),
                     lambda: optax.chain(scale_by_bnp_vectorised(),
                                         optax.sgd(1e-3))),
    'vec_welford': (make_apply(stats_welford),
                    lambda: optax.chain(scale_by_bnp_vectorised(),
                                        optax.sgd(1e-3))),
    'stats_welford': (make_apply(stats_welford),
                      lambda: optax.chain(store_statistics(),
                                          optax.sgd(1e-3))),
    'stats_variadic': (make_apply(stats_variadic),
                       lambda: optax.chain(store_statistics(),
                                           optax.sgd(1e-3))),
    'bnp_lean': (_shifted, _tx(matvec='new', finite_mode='elementwise')),
}


# ------------------------------------------------- statistics across layers


def make_grouped_apply():
  """Records layer inputs in the forward pass, reduces them together after.

  Layer inputs with the same number of rows (batch x positions) are
  concatenated along the feature axis and reduced as one array: two
  reductions for the whole network instead of two per layer.
  """

  intercept = _intercept(lambda module, x, nb, positions: module.sow(
      COLLECTION, 'inputs', (lax.stop_gradient(x), nb, positions)))

  def apply(model, variables, x):
    with nn.intercept_methods(intercept):
      y, mutated = model.apply(variables, x, mutable=[COLLECTION])
    found = []

    def walk(tree, path):
      if 'inputs' in tree:
        found.append((path, tree['inputs'][0]))
        return
      for k, v in tree.items():
        walk(v, path + (k,))

    walk(mutated[COLLECTION], ())
    groups = {}
    for path, (inp, nb, positions) in found:
      rows = inp.astype(jnp.float32).reshape(-1, inp.shape[-1])
      groups.setdefault(rows.shape[0], []).append(
          (path, rows, math.prod(inp.shape[:nb]), positions))
    out = {}
    for n, members in groups.items():
      cat = jnp.concatenate([m[1] for m in members], axis=1)
      mean = jnp.mean(cat, axis=0)
      var = jnp.mean(jnp.square(cat - mean[None, :]), axis=0)
      offset = 0
      for path, rows, batch, positions in members:
        c = rows.shape[1]
        node = out
        for k in path[:-1]:
          node = node.setdefault(k, {})
        f = lambda v: jnp.asarray(v, jnp.float32)
        node[path[-1]] = Stats(mean[offset:offset + c],
                               var[offset:offset + c], f(n), f(batch),
                               f(positions))
        offset += c
    return y, out

  return apply


_grouped = make_grouped_apply()
VARIANTS['grouped_stats_only'] = (
    _grouped, lambda: optax.chain(store_statistics(), optax.sgd(1e-3)))
VARIANTS['grouped_vectorised'] = (
    _grouped, lambda: optax.chain(scale_by_bnp_vectorised(), optax.sgd(1e-3)))


def stats_dot2pass(x, num_batch_axes, positions):
  """Two-pass statistics with the batch sums as dots with ``1/n``.

  The same two passes as ``stats_twopass`` (mean, then the mean squared
  deviation from it), but each column sum is a matrix-vector product, which
  XLA:CPU runs as a library GEMV instead of a (slow, on this machine) column
  reduction.
  """
  x = lax.stop_gradient(x).astype(jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  weights = jnp.full((rows.shape[0],), 1 / rows.shape[0], jnp.float32)
  hi = lax.Precision.HIGHEST
  mean = jnp.dot(weights, rows, precision=hi)
  var = jnp.dot(weights, jnp.square(rows - mean[None, :]), precision=hi)
  return _stats(x, rows, mean, var, num_batch_axes, positions)


_dot2pass = make_apply(stats_dot2pass)
VARIANTS['dot2pass_stats_only'] = (
    _dot2pass, lambda: optax.chain(store_statistics(), optax.sgd(1e-3)))
VARIANTS['dot2pass_vectorised'] = (
    _dot2pass, lambda: optax.chain(scale_by_bnp_vectorised(), optax.sgd(1e-3)))


def _core_bnp():
  import bnp_optax  # pylint: disable=import-outside-toplevel
  return bnp_optax.bnp(1e-3)


def _core_apply_patched(column_sums):
  """``bnp_optax.linen.apply`` traced with another ``_column_sums``.

  The core's ``statistics._column_sums`` is swapped while the step is
  traced, to measure its choice (GEMV up to 128 rows on CPU) side by side.
  """

  def apply(model, variables, x):
    import bnp_optax  # pylint: disable=import-outside-toplevel
    from bnp_optax._src import statistics  # pylint: disable=import-outside-toplevel

    original = statistics._column_sums  # pylint: disable=protected-access
    statistics._column_sums = column_sums
    try:
      return bnp_optax.linen.apply(model, variables, x)
    finally:
      statistics._column_sums = original

  return apply


def _gemv(rows):
  return jnp.dot(jnp.ones(rows.shape[:1], rows.dtype), rows,
                 precision=lax.Precision.HIGHEST)


def _gemv_if_few_rows(rows):
  return _gemv(rows) if rows.shape[0] <= 128 else jnp.sum(rows, axis=0)


_calls = [0]


def _gemv_for_mean_only(rows):
  # input_statistics calls the column sums for the mean, then the variance.
  _calls[0] += 1
  return _gemv(rows) if _calls[0] % 2 else jnp.sum(rows, axis=0)


VARIANTS['core_reduce_stats'] = (
    _core_apply_patched(lambda rows: jnp.sum(rows, axis=0)),
    lambda: _core_bnp())
VARIANTS['core_gemv_few_rows'] = (
    _core_apply_patched(_gemv_if_few_rows), lambda: _core_bnp())
VARIANTS['core_gemv_mean_only'] = (
    _core_apply_patched(_gemv_for_mean_only), lambda: _core_bnp())
