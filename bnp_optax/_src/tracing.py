"""Layer input statistics of any JAX function, found by tracing it.

This module traces ``fn(params, *args)`` to a jaxpr, has
``tracing_analysis`` find its layers (which ``dot_general`` and
``conv_general_dilated`` equations are dense and convolutional layers, their
biases, why other parameters are passed through), then evaluates the jaxpr
with an interpreter that also reduces each layer's activation operand to its
:class:`~bnp_optax.LayerStats` (:func:`_evaluate`): the statistics come from
the one forward pass, under whatever ``jit``/``grad``/``vmap`` the caller
applies, and no activation is kept.

Higher-order primitives: ``jit`` is inlined, ``remat``/``checkpoint`` is
re-applied around the interpreted body (with the statistics as extra, non
differentiated outputs), ``scan`` is re-applied with the statistics as extra
per-step outputs: a kernel closed over by the body is one layer used at every
step (its statistics merged over the steps), a kernel sliced from a stacked
parameter ``(steps, ...)`` is one layer per step (the stacked axis is an
independent axis of the leaf, as for Flax's ``nn.scan``).
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
from jax import lax
from jax.extend import core as jax_core
import numpy as np

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import statistics
from bnp_optax._src import tracing_analysis as analysis_lib


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic,
                        jax.ShapeDtypeStruct))


@dataclasses.dataclass
class _Traced:
  """A function traced to a jaxpr, with its parameter leaves named."""

  closed: Any
  out_tree: Any
  names: list[str]  # path of each dynamic parameter leaf
  all_names: list[str]  # path of every parameter leaf
  dynamic: list  # the dynamic parameter and argument leaves, in order
  analysis: analysis_lib.Analysis
  layers: dict[int, layers_lib.LeafLayer]


def _trace(fn: Callable, params, args, kwargs) -> _Traced:
  flat, p_def = jax.tree_util.tree_flatten_with_path(params)
  layers_lib.check_unique_names([kp for kp, _ in flat])
  p_leaves = [leaf for _, leaf in flat]
  all_names = [layers_lib.path_to_str(layers_lib.key_path_to_tuple(kp))
               for kp, _ in flat]
  p_dyn = [i for i, leaf in enumerate(p_leaves) if _is_array(leaf)]
  a_leaves, a_def = jax.tree_util.tree_flatten((args, kwargs))
  a_dyn = [i for i, leaf in enumerate(a_leaves) if _is_array(leaf)]

  def flat_fn(p_values, a_values):
    p = list(p_leaves)
    for i, v in zip(p_dyn, p_values):
      p[i] = v
    a = list(a_leaves)
    for i, v in zip(a_dyn, a_values):
      a[i] = v
    f_args, f_kwargs = jax.tree_util.tree_unflatten(a_def, a)
    return fn(jax.tree_util.tree_unflatten(p_def, p), *f_args, **f_kwargs)

  p_values = [p_leaves[i] for i in p_dyn]
  a_values = [a_leaves[i] for i in a_dyn]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
      p_values, a_values)
  names = [all_names[i] for i in p_dyn]
  analysis = analysis_lib.analyse(
      closed.jaxpr, [tuple(v.shape) for v in p_values], len(a_values))
  layers = {
      leaf: layers_lib.LeafLayer(
          found.spec, None if found.bias is None else names[found.bias])
      for leaf, found in analysis.layers.items()}
  return _Traced(closed, jax.tree.structure(out_shape), names, all_names,
                 p_values + a_values, analysis, layers)


def _measure(site: analysis_lib.Site, invals, outvals) -> (
    statistics.LayerStats):
  """The statistics of a layer site's input, from the equation's values."""
  return statistics.input_statistics(
      invals[site.operand],
      feature_axes=site.feature_axes,
      batch_axes=site.batch_axes,
      positions=math.prod(outvals[0].shape[a] for a in site.out_spatial),
      spec=site.spec,
  )


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _evaluate(jaxpr, consts, args, analysis: analysis_lib.Analysis, layers,
              collected: dict[int, list]) -> list:
  """``eval_jaxpr`` that also takes the statistics at every layer site."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
    sub_jaxpr = analysis_lib.sub_jaxpr(eqn)
    if id(sub_jaxpr) not in analysis.active:
      outs = _bind(eqn, invals)
    elif name in analysis_lib.INLINED:
      outs = _evaluate(sub_jaxpr, sub.consts, invals, analysis, layers,
                       collected)
    elif name in analysis_lib.REMAT:
      def body(*xs, sub_jaxpr=sub_jaxpr):
        inner = {}
        return _evaluate(sub_jaxpr, (), xs, analysis, layers, inner), inner
      outs, inner = jax.checkpoint(
          body, prevent_cse=eqn.params['prevent_cse'],
          policy=eqn.params['policy'])(*invals)
      for leaf, stats in inner.items():
        collected.setdefault(leaf, []).extend(stats)
    else:  # scan
      outs = _evaluate_scan(eqn, invals, analysis, layers, collected)
    site = analysis.sites.get(id(eqn))
    if site is not None and site.leaf in layers:
      collected.setdefault(site.leaf, []).append(
          _measure(site, invals, outs))
    for v, value in zip(eqn.outvars, outs):
      if not isinstance(v, jax_core.DropVar):
        env[v] = value
  return [read(v) for v in jaxpr.outvars]


def _evaluate_scan(eqn, invals, analysis, layers, collected) -> list:
  p = eqn.params
  n_consts, n_carry = p['num_consts'], p['num_carry']
  consts = invals[:n_consts]
  closed = p['jaxpr']

  def body(carry, xs):
    inner = {}
    outs = _evaluate(closed.jaxpr, closed.consts, [*consts, *carry, *xs],
                     analysis, layers, inner)
    return outs[:n_carry], (outs[n_carry:], inner)

  carry, (ys, inner) = lax.scan(
      body, invals[n_consts:n_consts + n_carry],
      invals[n_consts + n_carry:], length=p['length'], reverse=p['reverse'],
      unroll=p['unroll'])
  # A kernel sliced per step is one layer per step, its site's spec already
  # stacked; a kernel closed over by the body is one layer at every step.
  for leaf, stats in inner.items():
    if leaf in analysis.sliced:
      combined = [statistics.unstack(s, spec=s.spec) for s in stats]
    else:
      combined = [statistics.merge_stacked(s) for s in stats]
    collected.setdefault(leaf, []).extend(combined)
  return [*carry, *ys]


def layer_specs(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> dict[str, layers_lib.LeafLayer]:
  """The layers of ``fn(params, *args, **kwargs)``, for ``scale_by_bnp``.

  ``fn`` is traced abstractly (nothing is computed); every ``dot_general``
  or ``conv_general_dilated`` with a parameter leaf as one operand (see
  :func:`apply`) is a layer. The optimizer needs them when it is created:
  ``bnp_optax.bnp(lr, layer_specs=layer_specs(fn, params, x))``.

  Args:
    fn: the model, called as ``fn(params, *args, **kwargs)``.
    params: the parameters (any pytree of arrays, or of
      ``jax.ShapeDtypeStruct``).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``; leaves
      that are not arrays are passed to ``fn`` unchanged, as static values).
    **kwargs: example keyword arguments, likewise.

  Returns:
    ``{kernel leaf path: LeafLayer}``, to pass as ``layer_specs=``.

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> params = {'w': jnp.ones((3, 4)), 'b': jnp.zeros(4)}
    >>> fn = lambda p, x: jnp.tanh(x @ p['w'] + p['b'][None, :])
    >>> specs = bnp_optax.tracing.layer_specs(fn, params, jnp.ones((8, 3)))
    >>> specs['w']
    LeafLayer(spec=LayerSpec(spatial_axes=(), fan_in_axes=(0,), \
independent_axes=(), feature_groups=1), bias='b')
  """
  traced = _trace(fn, params, args, kwargs)
  return {traced.names[leaf]: layer
          for leaf, layer in sorted(traced.layers.items())}


def apply(
    fn: Callable[..., Any], params: Any, *args: Any, axis_name: Any = None,
    **kwargs: Any
) -> tuple[Any, dict[str, statistics.LayerStats]]:
  r"""Runs ``fn(params, *args, **kwargs)`` and returns the layer statistics.

  A layer is a ``dot_general`` or ``conv_general_dilated`` (what ``x @ w``,
  ``jnp.dot``, ``jnp.einsum``, ``lax.conv`` and the dense and convolutional
  layers of Flax, Equinox and Haiku compute) whose one operand is a leaf of
  ``params`` (transposed, converted or reshaped by size-1 axes at most) and
  whose other operand does not derive from parameters; its bias is a leaf
  added to its output. The statistics of the other operand, the layer
  input, are those of the paper: per input feature over every other axis
  (Eq. 13), per input channel over the batch and spatial axes for a
  convolution (Eqs. 21-22), with ``positions`` the output positions. A
  kernel used by several layers (tied weights, a kernel closed over by a
  ``scan`` body) gets their merged statistics; a stacked kernel sliced by a
  ``scan`` is one layer per step.

  ``fn`` is traced to a jaxpr once per call (once per compilation under
  ``jit``) and evaluated by an interpreter that takes the statistics as it
  goes, so the model runs once and no activation is kept. It works under
  ``jit``, ``grad`` and ``vmap`` of the caller, with ``jit``, ``remat`` and
  ``scan`` inside ``fn``. Parameters that reach a layer in other ways are
  left alone; :func:`describe` says which and why.

  Args:
    fn: the model, called as ``fn(params, *args, **kwargs)``.
    params: any pytree whose array leaves are the parameters (a dict, an
      Equinox module's arrays from ``eqx.partition``, Haiku's params).
    *args: arguments of ``fn``; array leaves are traced, other leaves are
      static.
    axis_name: inside ``shard_map`` or ``pmap`` with the batch split over
      this mapped axis, combine every device's statistics into those of the
      global batch (see :func:`bnp_optax.all_reduce_statistics`), as
      ``bnp_optax.linen.apply`` does. Not needed under ``jax.jit`` with a
      sharded batch, where the statistics are global already. Not passed to
      ``fn``.
    **kwargs: keyword arguments of ``fn``, likewise.

  Returns:
    ``(fn(params, *args, **kwargs), layer_stats)``, ``layer_stats`` a dict
    from each kernel leaf's path to its :class:`~bnp_optax.LayerStats`, for
    ``tx.update(..., layer_stats=layer_stats)`` with ``layer_specs`` from
    :func:`layer_specs`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import bnp_optax
    >>> params = {'w': jnp.ones((3, 4)), 'b': jnp.zeros(4)}
    >>> fn = lambda p, x: jnp.tanh(x @ p['w'] + p['b'][None, :])
    >>> x = jnp.array([[0., 1., 2.], [2., 1., 4.]])
    >>> tx = bnp_optax.bnp(0.1, layer_specs=bnp_optax.tracing.layer_specs(
    ...     fn, params, x))
    >>> state = tx.init(params)
    >>> def loss(p):
    ...   y, layer_stats = bnp_optax.tracing.apply(fn, p, x)
    ...   return jnp.sum(y ** 2), layer_stats
    >>> grads, layer_stats = jax.grad(loss, has_aux=True)(params)
    >>> print(layer_stats['w'].mean, layer_stats['w'].variance)
    [1. 1. 3.] [1. 0. 1.]
    >>> updates, state = tx.update(grads, state, params,
    ...                            layer_stats=layer_stats)

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Secs. 3.3 and 4: each layer's input statistics, Eqs. 13 and 21-22).
  """
  traced = _trace(fn, params, args, kwargs)
  collected: dict[int, list] = {}
  outs = _evaluate(traced.closed.jaxpr, traced.closed.consts, traced.dynamic,
                   traced.analysis, traced.layers, collected)
  layer_stats = {
      traced.names[leaf]: statistics.merge_statistics(collected[leaf])
      for leaf in sorted(traced.layers)
  }
  if axis_name is not None:
    layer_stats = statistics.all_reduce_statistics(layer_stats, axis_name)
  return jax.tree_util.tree_unflatten(traced.out_tree, outs), layer_stats


def describe(
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
) -> dict[str, str]:
  """What BNP does to each parameter leaf of ``fn``, and why.

  Like :func:`bnp_optax.describe_coverage`, from a trace of ``fn`` (nothing
  is computed), with the reason a parameter that feeds a
  ``dot_general``/``conv_general_dilated`` is not preconditioned.

  Args:
    fn: the model, called as ``fn(params, *args, **kwargs)``.
    params: its parameters.
    *args: example arguments, as for :func:`layer_specs`.
    **kwargs: example keyword arguments.

  Returns:
    ``{leaf path: role}``, the role one of ``'dense kernel'``, ``'dense
    bias'``, ``'conv kernel'``, ``'conv bias'``, ``'pass-through'`` or
    ``'pass-through: <reason>'``.

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> def fn(p, x):  # weight normalisation: v / |v| is not a view of v
    ...   v = p['v'] / jnp.linalg.norm(p['v'], axis=0, keepdims=True)
    ...   return x @ v + p['b'][None, :]
    >>> params = {'v': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> for path, role in bnp_optax.tracing.describe(
    ...     fn, params, jnp.ones((4, 3))).items():
    ...   print(f'{path}: {role[:48]}')
    b: pass-through
    v: pass-through: transformed before its dot_general
  """
  traced = _trace(fn, params, args, kwargs)
  roles = {name: 'pass-through' for name in traced.all_names}
  for leaf, reasons in traced.analysis.reasons.items():
    roles[traced.names[leaf]] = 'pass-through: ' + '; '.join(reasons)
  for leaf, layer in traced.layers.items():
    roles[traced.names[leaf]] = f'{layer.spec.kind} kernel'
    if layer.bias is not None:
      roles[layer.bias] = f'{layer.spec.kind} bias'
  return dict(sorted(roles.items()))
