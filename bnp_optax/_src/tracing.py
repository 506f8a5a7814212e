"""Layer input statistics of any JAX function, found by tracing it.

Every dense and convolutional layer, whatever library wrote it, ends up as a
``dot_general`` or ``conv_general_dilated`` with a parameter as one operand.
This module traces ``fn(params, *args)`` to a jaxpr and finds those
equations (:func:`_analyse`), then evaluates the jaxpr with an interpreter
that also reduces each layer's activation operand to its
:class:`~bnp_optax.LayerStats` (:func:`_evaluate`): the statistics come from
the one forward pass, under whatever ``jit``/``grad``/``vmap`` the caller
applies, and no activation is kept.

What counts as a layer: one operand is a *view* of a parameter leaf (the leaf
itself, or its transpose, element-type conversion, or a reshape that only
adds or drops size-1 axes) and the other operand is not derived from
parameters. Its bias is a parameter leaf added to the layer's output (through
views and broadcasts along the non-feature axes). Parameters that reach a
``dot_general``/``conv_general_dilated`` any other way (weight
normalisation, a kernel computed from parameters, a product of two
parameters, inside a ``cond``/``while``/``custom_jvp``) are not
preconditioned, and :func:`describe` says why.

Higher-order primitives: ``jit`` is inlined, ``remat``/``checkpoint`` is
re-applied around the interpreted body (with the statistics as extra, non
differentiated outputs), ``scan`` is re-applied with the statistics as extra
per-step outputs: a kernel closed over by the body is one layer used at every
step (its statistics merged over the steps), a kernel sliced from a stacked
parameter ``(steps, ...)`` is one layer per step (the stacked axis is an
independent axis of the leaf, as for Flax's ``nn.scan``).
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

import jax
from jax import lax
from jax.extend import core as jax_core
import numpy as np

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import layout
from bnp_optax._src import statistics

# Primitives that give a view of their operand: same elements, same order
# along every axis of size > 1 (checked in _view_rule).
_VIEW_PRIMITIVES = frozenset({
    'convert_element_type', 'copy', 'copy_p', 'transpose', 'reshape',
    'squeeze', 'expand_dims', 'broadcast_in_dim', 'sharding_constraint',
})
_INLINED = frozenset({'jit', 'pjit', 'closed_call', 'core_call'})
# Indexing a parameter (``p['w'][i]``) makes a kernel per index that is not
# a view of the whole leaf; only lax.scan's slicing is one layer per step.
_INDEXING = frozenset({'slice', 'dynamic_slice', 'gather'})
_INDEXED = ('indexed or sliced before use (e.g. p[...][i] in a Python loop '
            'or fori_loop); a stack of kernels is captured when lax.scan '
            'slices it, one layer per step')
_REMAT = frozenset({'remat2', 'checkpoint', 'remat'})
_DOT = 'dot_general'
_CONV = 'conv_general_dilated'
_FAN_IN, _INDEPENDENT, _OUTPUT, _SPATIAL = 'fan-in', 'independent', 'out', 's'


@dataclasses.dataclass(frozen=True)
class _Value:
  """What the analysis knows of a jaxpr variable.

  Attributes:
    sources: the parameter leaves it is computed from.
    data: whether it depends on the arguments of ``fn`` (an activation); a
      value with sources and no data is computed from parameters alone.
    leaf: when it is a view of one leaf, that leaf, else ``None``.
    axes: for a view, the leaf axis behind each of its axes (``None`` for a
      size-1 or broadcast axis).
    broadcast: whether the view repeats elements (a bias broadcast to the
      layer output; never a kernel).
    note: why a value derived from parameters is not a view, if known.
    sliced: the leaf axes that the enclosing ``scan`` slices (one kernel per
      iteration); ``()`` outside such a scan.
  """

  sources: frozenset[int] = frozenset()
  data: bool = False
  leaf: int | None = None
  axes: tuple[int | None, ...] = ()
  broadcast: bool = False
  note: str | None = None
  sliced: tuple[int, ...] = ()


_CONSTANT = _Value()
_DATA = _Value(data=True)


def _derived(values: Sequence[_Value], note: str | None = None) -> _Value:
  sources = frozenset().union(*(v.sources for v in values))
  data = any(v.data for v in values)
  if not sources:
    return _DATA if data else _CONSTANT
  notes = [v.note for v in values if v.note]
  return _Value(sources, data, note=notes[0] if notes else note)


def _is_parameter(value: _Value) -> bool:
  """Computed from parameters alone: a kernel, not an activation."""
  return bool(value.sources) and not value.data


@dataclasses.dataclass
class _Site:
  """One layer equation: which leaf, its layout, how to take statistics."""

  leaf: int
  spec: layout.LayerSpec
  operand: int  # which invar is the activation
  feature_axes: tuple[int, ...]
  batch_axes: tuple[int, ...] | None
  out_spatial: tuple[int, ...]  # output axes whose sizes are the positions
  output_labels: tuple[tuple[str, int] | None, ...]  # per output axis
  sliced: tuple[int, ...] = ()  # leaf axes sliced by the enclosing scan
  bias: int | None = None

  def statistics(self, invals, outvals) -> statistics.LayerStats:
    x = invals[self.operand]
    y = outvals[0]
    return statistics.input_statistics(
        x,
        feature_axes=self.feature_axes,
        batch_axes=self.batch_axes,
        positions=math.prod(y.shape[a] for a in self.out_spatial),
        spec=self.spec,
    )


@dataclasses.dataclass
class _Analysis:
  """The layers of a traced function, and why other parameters are not."""

  num_leaves: int
  sites: dict[int, _Site] = dataclasses.field(default_factory=dict)
  reasons: dict[int, list[str]] = dataclasses.field(default_factory=dict)
  uses: dict[int, int] = dataclasses.field(default_factory=dict)
  # kernels sliced per iteration of a scan: one layer per step
  sliced: set[int] = dataclasses.field(default_factory=set)
  # ids of the jaxprs that contain a site, directly or nested
  active: set[int] = dataclasses.field(default_factory=set)

  def reject(self, leaves, reason: str) -> None:
    for leaf in leaves:
      self.reasons.setdefault(leaf, [])
      if reason not in self.reasons[leaf]:
        self.reasons[leaf].append(reason)


def _view_rule(eqn, value: _Value) -> _Value | None:
  """The view an eqn makes of a view, or ``None`` if it is not one."""
  name = eqn.primitive.name
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  axes = value.axes
  if name in ('convert_element_type', 'copy', 'copy_p',
              'sharding_constraint'):
    return value
  if name == 'transpose':
    perm = eqn.params['permutation']
    return dataclasses.replace(value, axes=tuple(axes[p] for p in perm))
  if name == 'broadcast_in_dim':
    new_axes = [None] * len(out_shape)
    broadcast = value.broadcast
    for j, d in enumerate(eqn.params['broadcast_dimensions']):
      if in_shape[j] == out_shape[d]:
        new_axes[d] = axes[j]
      else:
        broadcast = True
    broadcast |= math.prod(out_shape) != math.prod(in_shape)
    return dataclasses.replace(value, axes=tuple(new_axes),
                               broadcast=broadcast)
  if name in ('reshape', 'squeeze', 'expand_dims'):
    if name == 'reshape' and eqn.params.get('dimensions') is not None:
      return None
    kept_in = [a for a, n in zip(axes, in_shape) if n != 1]
    big_in = [n for n in in_shape if n != 1]
    big_out = [n for n in out_shape if n != 1]
    if big_in != big_out:  # merges or splits axes
      return None
    it = iter(kept_in)
    new_axes = tuple(next(it) if n != 1 else None for n in out_shape)
    return dataclasses.replace(value, axes=new_axes)
  return None


def _kernel_layout(
    leaf_ndim: int, view: _Value, kernel_kinds: Sequence[str]
) -> tuple[dict[int, int], list[str]] | str:
  """Maps the kernel operand's axes to the leaf's, with each leaf axis' kind.

  Returns ``({operand axis: leaf axis}, leaf axis kinds)`` or the reason
  the leaf cannot be laid out so.
  """
  kinds = [_OUTPUT] * leaf_ndim  # size-1 axes the view dropped: outputs
  for axis in view.sliced:
    kinds[axis] = _INDEPENDENT
  to_leaf = {}
  for axis, (leaf_axis, kind) in enumerate(zip(view.axes, kernel_kinds)):
    if leaf_axis is not None:
      kinds[leaf_axis] = kind
      to_leaf[axis] = leaf_axis
  if _FAN_IN not in kinds:
    return 'its fan-in axis is not an axis of the parameter'
  return to_leaf, kinds


def _dot_site(eqn, values: Sequence[_Value], analysis: _Analysis,
              leaf_shapes) -> _Site | None:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  a, b = values
  if _is_parameter(a) and _is_parameter(b):
    analysis.reject(
        a.sources | b.sources,
        'both operands of a dot_general are computed from parameters alone '
        '(a product of parameters, or a parameter used as both operands)')
    return None
  if not (_is_parameter(a) or _is_parameter(b)):
    return None
  k, operand = (0, 1) if _is_parameter(a) else (1, 0)
  kernel = values[k]
  kc, kb, xc, xb = (lc, lb, rc, rb) if k == 0 else (rc, rb, lc, lb)
  if kernel.leaf is None or kernel.broadcast:
    analysis.reject(kernel.sources, kernel.note or (
        'transformed before its dot_general by an operation that is not a '
        'transpose, reshape or type conversion (e.g. weight normalisation, '
        'or a kernel computed from parameters)'))
    return None
  ndim = eqn.invars[k].aval.ndim
  kinds = [_OUTPUT] * ndim
  for axis in kc:
    kinds[axis] = _FAN_IN
  for axis in kb:
    kinds[axis] = _INDEPENDENT
  found = _kernel_layout(len(leaf_shapes[kernel.leaf]), kernel, kinds)
  if isinstance(found, str):
    analysis.reject(kernel.sources, found)
    return None
  to_leaf, leaf_kinds = found
  independent = tuple(
      i for i, kind in enumerate(leaf_kinds)
      if kind == _INDEPENDENT and i not in kernel.sliced)
  fan_in = tuple(i for i, kind in enumerate(leaf_kinds) if kind == _FAN_IN)
  # The scan stacks the per-step statistics in front: sliced axes first.
  spec = layout.LayerSpec((), fan_in, kernel.sliced + independent)
  # The activation axis paired with each kernel axis, in the spec's order.
  pairs = dict(zip(kc, xc)) | dict(zip(kb, xb))
  from_leaf = {leaf_axis: axis for axis, leaf_axis in to_leaf.items()}
  feature_axes = tuple(pairs[from_leaf[p]] for p in independent + fan_in)
  # dot_general's output: batch axes, then lhs free, then rhs free axes.
  k_free = [i for i in range(ndim) if i not in kc and i not in kb]
  x_ndim = eqn.invars[operand].aval.ndim
  x_free = [i for i in range(x_ndim) if i not in xc and i not in xb]
  batch = [(_INDEPENDENT, to_leaf.get(i)) for i in kb]
  k_labels = [(_OUTPUT, to_leaf.get(i)) for i in k_free]
  x_labels = [None] * len(x_free)
  labels = batch + (k_labels + x_labels if k == 0 else x_labels + k_labels)
  return _Site(kernel.leaf, spec, operand, feature_axes, None, (),
               tuple(labels), kernel.sliced)


def _conv_site(eqn, values: Sequence[_Value], analysis: _Analysis,
               leaf_shapes) -> _Site | None:
  lhs, rhs = values
  if _is_parameter(lhs):
    analysis.reject(
        lhs.sources | (rhs.sources if _is_parameter(rhs) else set()),
        'used as the input (lhs) of a conv_general_dilated, or both operands '
        'are computed from parameters alone')
    return None
  if not _is_parameter(rhs):
    return None
  params = eqn.params
  if rhs.leaf is None or rhs.broadcast:
    analysis.reject(rhs.sources, rhs.note or (
        'transformed before its convolution by an operation that is not a '
        'transpose, reshape or type conversion (e.g. weight normalisation)'))
    return None
  if any(d != 1 for d in params['lhs_dilation']):
    analysis.reject(rhs.sources, 'a transposed convolution (lhs_dilation) '
                    'sees a zero-dilated input')
    return None
  if params['batch_group_count'] != 1:
    analysis.reject(rhs.sources, 'batch_group_count > 1')
    return None
  lhs_spec, rhs_spec, out_spec = params['dimension_numbers']
  kinds = [_SPATIAL] * eqn.invars[1].aval.ndim
  kinds[rhs_spec[0]], kinds[rhs_spec[1]] = _OUTPUT, _FAN_IN
  found = _kernel_layout(len(leaf_shapes[rhs.leaf]), rhs, kinds)
  if isinstance(found, str):
    analysis.reject(rhs.sources, found)
    return None
  to_leaf, leaf_kinds = found
  spec = layout.LayerSpec(
      spatial_axes=tuple(
          i for i, kind in enumerate(leaf_kinds) if kind == _SPATIAL),
      fan_in_axes=tuple(
          i for i, kind in enumerate(leaf_kinds) if kind == _FAN_IN),
      independent_axes=rhs.sliced,
      feature_groups=params['feature_group_count'],
  )
  try:
    layout.check_spec('', spec, leaf_shapes[rhs.leaf])
  except ValueError:
    analysis.reject(rhs.sources, f'its layout {spec} does not fit the leaf')
    return None
  labels = [None] * len(out_spec)
  labels[out_spec[1]] = (_OUTPUT, to_leaf.get(rhs_spec[0]))
  return _Site(rhs.leaf, spec, 0, (lhs_spec[1],), (lhs_spec[0],),
               tuple(out_spec[2:]), tuple(labels), rhs.sliced)


def _slice(value: _Value) -> _Value:
  """What a scan body sees of a value it scans over (axis 0 sliced)."""
  if not _is_parameter(value):
    return value
  if (value.leaf is None or value.broadcast or value.sliced
      or value.axes[0] is None):
    return _derived([value], 'sliced by a scan in a way that is not one '
                    'kernel per iteration')
  return dataclasses.replace(value, axes=value.axes[1:],
                             sliced=(value.axes[0],))


def _uses(jaxpr) -> dict[Any, int]:
  counts = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jax_core.Literal):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if not isinstance(v, jax_core.Literal):
      counts[v] = counts.get(v, 0) + 2  # an output: used outside
  return counts


def _find_bias(jaxpr, start: int, site: _Site, env, uses,
               leaf_shapes) -> int | None:
  """The leaf added to the output of ``jaxpr.eqns[start]``, if a bias."""
  var = jaxpr.eqns[start].outvars[0]
  labels = list(site.output_labels)
  shape = tuple(var.aval.shape)
  position = start
  while True:
    if uses.get(var, 0) != 1:
      return None
    consumer = next(
        (i, e) for i, e in enumerate(jaxpr.eqns[position + 1:], position + 1)
        if any(v is var for v in e.invars))
    position, eqn = consumer
    name = eqn.primitive.name
    if name in _VIEW_PRIMITIVES:
      moved = _view_rule(eqn, _Value(leaf=-1, axes=tuple(range(len(shape)))))
      if moved is None or moved.broadcast:
        return None
      labels = [None if a is None else labels[a] for a in moved.axes]
      var = eqn.outvars[0]
      shape = tuple(var.aval.shape)
      continue
    if name not in ('add', 'add_any'):
      return None
    other = eqn.invars[1] if eqn.invars[0] is var else eqn.invars[0]
    if isinstance(other, jax_core.Literal):
      return None
    bias = env.get(other, _CONSTANT)
    if bias.leaf is None or bias.leaf == site.leaf:
      return None
    # Sliced by the same scan as the kernel, in front (the stacked layers'
    # biases (steps, n_out)), or not at all.
    if len(bias.sliced) != len(site.sliced) or any(
        a is not None and a < s for a in bias.axes for s in bias.sliced):
      return None
    other_shape = tuple(other.aval.shape)
    if len(other_shape) != len(shape):
      return None
    order, bias_axes = [], []
    for label, n, m, bias_axis in zip(labels, shape, other_shape,
                                      bias.axes):
      if m > n:  # the add would broadcast the layer output
        return None
      if n == 1:
        continue
      if label is None:
        if bias_axis is not None and m != 1:
          return None
      else:
        if bias_axis is None or m != n or label[1] is None:
          return None
        order.append(label)
        bias_axes.append(bias_axis)
    # The bias' elements must be in the order of the kernel's independent
    # and output axes (what the core's reshape of the bias gradient needs).
    kernel_shape = leaf_shapes[site.leaf]
    spec = site.spec
    want = [a for a in spec.independent_axes + spec.output_axes(
        len(kernel_shape)) if kernel_shape[a] != 1 and a not in site.sliced]
    if [a for _, a in order] != want or bias_axes != sorted(bias_axes):
      return None
    if math.prod(leaf_shapes[bias.leaf]) != math.prod(
        spec.bias_shape(kernel_shape)):
      return None
    return bias.leaf


def _analyse_jaxpr(jaxpr, in_values: Sequence[_Value], analysis: _Analysis,
                   leaf_shapes, context: str | None) -> list[_Value]:
  """Walks ``jaxpr``, recording layer sites; returns the outputs' values.

  ``context`` names the enclosing primitive whose layers cannot be
  captured (``cond``, ``while``, ...), or is ``None``.
  """
  env: dict[Any, _Value] = dict(zip(jaxpr.invars, in_values))
  read = lambda v: (_CONSTANT if isinstance(v, jax_core.Literal)
                    else env.get(v, _CONSTANT))
  active = False
  pending = []  # layer sites whose bias is looked for once env is complete
  for index, eqn in enumerate(jaxpr.eqns):
    values = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    outs = None
    # Direct uses of each leaf (of a view of it) other than by views and
    # calls (whose bodies are counted): a bias must have no use but its add.
    counted = name not in _INLINED | _REMAT | {'scan'}
    if name in _VIEW_PRIMITIVES and values and values[0].leaf is not None:
      view = _view_rule(eqn, values[0])
      counted = view is None
      outs = [view if view is not None else _derived(values)]
    elif name in (_DOT, _CONV):
      site_fn = _dot_site if name == _DOT else _conv_site
      site = site_fn(eqn, values, analysis, leaf_shapes)
      if site is not None:
        if context is not None:
          analysis.reject({site.leaf}, f'used as a kernel inside {context}, '
                          'where statistics are not captured')
        else:
          pending.append((index, site))
          analysis.sites[id(eqn)] = site
          if site.sliced:
            analysis.sliced.add(site.leaf)
          active = True
      outs = [_derived(values)]
    elif name in _INLINED or name in _REMAT:
      sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
      sub_jaxpr = getattr(sub, 'jaxpr', sub)
      outs = _analyse_jaxpr(sub_jaxpr, values, analysis, leaf_shapes,
                            context)
      active |= id(sub_jaxpr) in analysis.active
    elif name == 'scan':
      p = eqn.params
      n_consts, n_carry = p['num_consts'], p['num_carry']
      inner = [
          _derived([v], 'sliced by an outer scan and used in an inner one')
          if v.sliced else v for v in values[:n_consts]]
      inner += [_derived([v]) for v in values[n_consts:n_consts + n_carry]]
      inner += [_slice(v) for v in values[n_consts + n_carry:]]
      sub_jaxpr = p['jaxpr'].jaxpr
      _analyse_jaxpr(sub_jaxpr, inner, analysis, leaf_shapes, context)
      active |= id(sub_jaxpr) in analysis.active
      outs = [_derived(values)] * len(eqn.outvars)
    else:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        sub_jaxpr = getattr(sub, 'jaxpr', sub)
        n = len(sub_jaxpr.invars)
        # Operands passed one to one (cond: after the branch index), so that
        # kernels inside are recognised, and reported.
        if n == len(values):
          sub_in = list(values)
        elif n == len(values) - 1 and name == 'cond':
          sub_in = list(values[1:])
        else:
          sub_in = [_derived(values)] * n
        _analyse_jaxpr(sub_jaxpr, sub_in, analysis, leaf_shapes,
                       context or f'a {name}')
    if counted:
      for leaf in {v.leaf for v in values if v.leaf is not None}:
        analysis.uses[leaf] = analysis.uses.get(leaf, 0) + 1
    if outs is None and name in _INDEXING and values[0].leaf is not None:
      outs = [_derived(values, _INDEXED)] * len(eqn.outvars)
    if outs is None:
      outs = [_derived(values)] * len(eqn.outvars)
    for v, value in zip(eqn.outvars, outs):
      env[v] = value
  uses = _uses(jaxpr)
  for index, site in pending:
    site.bias = _find_bias(jaxpr, index, site, env, uses, leaf_shapes)
  if active:
    analysis.active.add(id(jaxpr))
  return [read(v) for v in jaxpr.outvars]


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
  shapes: list[tuple[int, ...]]
  dynamic: list  # the dynamic parameter and argument leaves, in order
  analysis: _Analysis
  layers: dict[int, layers_lib.LeafLayer]


def _trace(fn: Callable, params, args, kwargs) -> _Traced:
  flat, p_def = jax.tree_util.tree_flatten_with_path(params)
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
  shapes = [tuple(v.shape) for v in p_values]
  analysis = _Analysis(len(p_values))
  in_values = [_Value(frozenset({i}), leaf=i, axes=tuple(range(len(s))))
               for i, s in enumerate(shapes)]
  in_values += [_DATA] * len(a_values)
  _analyse_jaxpr(closed.jaxpr, in_values, analysis, shapes, None)
  layers = _layers(analysis, shapes, names)
  return _Traced(closed, jax.tree.structure(out_shape), names, all_names,
                 shapes, p_values + a_values, analysis, layers)


def _layers(analysis: _Analysis, shapes, names) -> dict[int,
                                                        layers_lib.LeafLayer]:
  """One :class:`LeafLayer` per kernel leaf, its sites agreeing."""
  by_leaf: dict[int, list[_Site]] = {}
  for site in analysis.sites.values():
    by_leaf.setdefault(site.leaf, []).append(site)
  kernels = set(by_leaf)
  layers = {}
  for leaf, sites in by_leaf.items():
    if leaf in analysis.reasons:
      continue
    specs = {s.spec for s in sites}
    if len(specs) > 1:
      analysis.reject({leaf}, f'used by layers of different layouts {specs}')
      continue
    if analysis.uses.get(leaf, 0) > len(sites):
      # e.g. an embedding table that is also the output layer's kernel: its
      # gradient is not a layer's alone, so BNP's change of variables for
      # that layer would also act on the other use's gradient.
      analysis.reject({leaf}, 'also used outside its dense/conv layers (e.g. '
                      'as an embedding table or an elementwise operand)')
      continue
    biases = {s.bias for s in sites}
    bias = biases.pop() if len(biases) == 1 else None
    if bias is not None and (
        bias in kernels or analysis.uses.get(bias, 0) != len(sites)):
      bias = None  # shared with something else: not this layer's own
    layers[leaf] = layers_lib.LeafLayer(
        sites[0].spec, None if bias is None else names[bias])
  return layers


def _bind(eqn, invals):
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*invals, **params)
  return outs if eqn.primitive.multiple_results else [outs]


def _evaluate(jaxpr, consts, args, analysis: _Analysis, layers,
              collected: dict[int, list]) -> list:
  """``eval_jaxpr`` that also takes the statistics at every layer site."""
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
    sub_jaxpr = getattr(sub, 'jaxpr', sub)
    if id(sub_jaxpr) not in analysis.active:
      outs = _bind(eqn, invals)
    elif name in _INLINED:
      outs = _evaluate(sub_jaxpr, sub.consts, invals, analysis, layers,
                       collected)
    elif name in _REMAT:
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
          site.statistics(invals, outs))
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
    fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any
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
