"""Which equations of a traced function are layers: the jaxpr analysis.

Every dense and convolutional layer, whatever library wrote it, ends up as a
``dot_general`` or ``conv_general_dilated`` with a parameter as one operand.
:func:`analyse` walks the jaxpr of ``fn(params, *args)`` and finds those
equations (the layer *sites*), each layer's bias, and why a parameter that
reaches a layer is not preconditioned. Nothing is evaluated here: the
interpreter in ``tracing`` evaluates the jaxpr and reduces the activation
operand of every site this module found.

What counts as a layer: one operand is a *view* of a parameter leaf (the leaf
itself, or its transpose, element-type conversion, or a reshape that only
adds or drops size-1 axes) and the other operand is not derived from
parameters. Its bias is a parameter leaf added to the layer's output (through
views and broadcasts along the non-feature axes). Parameters that reach a
``dot_general``/``conv_general_dilated`` any other way (weight
normalisation, a kernel computed from parameters, a product of two
parameters, inside a ``cond``/``while``/``custom_jvp``) are not
preconditioned, and the analysis records why.

Higher-order primitives: the bodies of ``jit`` and ``remat``/``checkpoint``
are walked as if inlined; a ``scan`` body sees a kernel closed over by it as
one layer used at every step, and a kernel sliced from a stacked parameter
``(steps, ...)`` as one layer per step (the stacked axis an independent axis
of the leaf, as for Flax's ``nn.scan``).
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any, NamedTuple

from jax.extend import core as jax_core

from bnp_optax._src import layout

# Primitives that give a view of their operand: same elements, same order
# along every axis of size > 1 (checked in _view_rule).
_VIEW_PRIMITIVES = frozenset({
    'convert_element_type', 'copy', 'copy_p', 'transpose', 'reshape',
    'squeeze', 'expand_dims', 'broadcast_in_dim', 'sharding_constraint',
})
# Inside shard_map, a replicated value (a parameter) used with a per-device
# one (the batch) is first marked device-varying; the values are unchanged.
_DEVICE_VARYING = frozenset({'pvary', 'pbroadcast'})
INLINED = frozenset({'jit', 'pjit', 'closed_call', 'core_call'})
# Indexing a parameter (``p['w'][i]``) makes a kernel per index that is not
# a view of the whole leaf; only lax.scan's slicing is one layer per step.
_INDEXING = frozenset({'slice', 'dynamic_slice', 'gather'})
_INDEXED = ('indexed or sliced before use (e.g. p[...][i] in a Python loop '
            'or fori_loop); a stack of kernels is captured when lax.scan '
            'slices it, one layer per step')
REMAT = frozenset({'remat2', 'checkpoint', 'remat'})
_SCAN = 'scan'
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
class Site:
  """One layer equation: which leaf, its layout, what to reduce.

  Attributes:
    leaf: the kernel's parameter leaf.
    spec: the kernel leaf's layout.
    operand: which operand of the equation is the layer input.
    feature_axes: the input axes kept by the statistics, in the spec's order.
    batch_axes: the input axes whose product is the batch size, or ``None``
      for every reduced axis.
    out_spatial: the output axes whose sizes multiply to the positions.
    output_labels: per output axis, ``(kind, leaf axis)`` of the kernel axis
      it comes from, or ``None`` for an axis of the input.
    sliced: the leaf axes sliced by the enclosing scan.
    bias: the leaf added to the output, once found.
  """

  leaf: int
  spec: layout.LayerSpec
  operand: int
  feature_axes: tuple[int, ...]
  batch_axes: tuple[int, ...] | None
  out_spatial: tuple[int, ...]
  output_labels: tuple[tuple[str, int] | None, ...]
  sliced: tuple[int, ...] = ()
  bias: int | None = None


class FoundLayer(NamedTuple):
  """A kernel leaf that is a layer: its layout and its bias leaf, if any."""

  spec: layout.LayerSpec
  bias: int | None


@dataclasses.dataclass
class Analysis:
  """The layers of a traced function, and why other parameters are not.

  Attributes:
    sites: the layer equations, by ``id`` of the equation.
    reasons: why each rejected leaf is passed through.
    uses: direct uses of each leaf other than by views and calls.
    sliced: kernels sliced per iteration of a scan: one layer per step.
    active: ids of the jaxprs that contain a site, directly or nested.
    layers: the kernel leaves that are layers, once all sites agree.
  """

  sites: dict[int, Site] = dataclasses.field(default_factory=dict)
  reasons: dict[int, list[str]] = dataclasses.field(default_factory=dict)
  uses: dict[int, int] = dataclasses.field(default_factory=dict)
  sliced: set[int] = dataclasses.field(default_factory=set)
  active: set[int] = dataclasses.field(default_factory=set)
  layers: dict[int, FoundLayer] = dataclasses.field(default_factory=dict)

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


def _kernel_axis_kinds(
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


def _dot_site(eqn, values: Sequence[_Value], analysis: Analysis,
              leaf_shapes) -> Site | None:
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
  found = _kernel_axis_kinds(len(leaf_shapes[kernel.leaf]), kernel, kinds)
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
  return Site(kernel.leaf, spec, operand, feature_axes, None, (),
               tuple(labels), kernel.sliced)


def _conv_site(eqn, values: Sequence[_Value], analysis: Analysis,
               leaf_shapes) -> Site | None:
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
  found = _kernel_axis_kinds(len(leaf_shapes[rhs.leaf]), rhs, kinds)
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
  return Site(rhs.leaf, spec, 0, (lhs_spec[1],), (lhs_spec[0],),
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




def _output_add(jaxpr, start: int, labels, uses):
  """Follows a layer's output through views to the add that consumes it.

  Returns:
    ``(add equation, the output as it enters the add, its axis labels)``, or
    ``None`` when the output has another use, or meets another operation.
  """
  var = jaxpr.eqns[start].outvars[0]
  labels = list(labels)
  position = start
  while uses.get(var, 0) == 1:
    position, eqn = next(
        (i, e) for i, e in enumerate(jaxpr.eqns[position + 1:], position + 1)
        if any(v is var for v in e.invars))
    name = eqn.primitive.name
    if name in ('add', 'add_any'):
      return eqn, var, labels
    if name not in _VIEW_PRIMITIVES:
      return None
    moved = _view_rule(eqn, _Value(leaf=-1, axes=tuple(range(var.aval.ndim))))
    if moved is None or moved.broadcast:
      return None
    labels = [None if a is None else labels[a] for a in moved.axes]
    var = eqn.outvars[0]
  return None


def _may_be_bias(bias: _Value, site: Site) -> bool:
  """A view of another leaf, sliced by the kernel's scan in front or not."""
  if bias.leaf is None or bias.leaf == site.leaf:
    return False
  # Sliced by the same scan as the kernel, in front (the stacked layers'
  # biases (steps, n_out)), or not at all.
  return len(bias.sliced) == len(site.sliced) and not any(
      a is not None and a < s for a in bias.axes for s in bias.sliced)


def _bias_along_outputs(labels, shape, bias_shape, bias_axes):
  """Pairs the bias' axes with the output's kernel axes.

  Returns:
    ``(the kernel's output labels, the bias leaf's axes)``, in the output's
    order, or ``None`` when the add would broadcast the layer output or the
    bias varies along an axis that is not the kernel's.
  """
  if len(bias_shape) != len(shape):
    return None
  order, leaf_axes = [], []
  for label, n, m, bias_axis in zip(labels, shape, bias_shape, bias_axes):
    if m > n:  # the add would broadcast the layer output
      return None
    if n == 1:
      continue
    if label is None:
      if bias_axis is not None and m != 1:
        return None
    elif bias_axis is None or m != n or label[1] is None:
      return None
    else:
      order.append(label)
      leaf_axes.append(bias_axis)
  return order, leaf_axes


def _in_kernel_order(site: Site, order, bias_axes, bias_leaf: int,
                     leaf_shapes) -> bool:
  """Whether the bias' elements are in the kernel's bias order.

  The order of the kernel's independent and output axes, which the core's
  reshape of the bias gradient needs, and as many elements.
  """
  kernel_shape = leaf_shapes[site.leaf]
  spec = site.spec
  want = [a for a in spec.independent_axes + spec.output_axes(
      len(kernel_shape)) if kernel_shape[a] != 1 and a not in site.sliced]
  if [a for _, a in order] != want or bias_axes != sorted(bias_axes):
    return False
  return math.prod(leaf_shapes[bias_leaf]) == math.prod(
      spec.bias_shape(kernel_shape))


def _find_bias(jaxpr, start: int, site: Site, env, uses,
               leaf_shapes) -> int | None:
  """The leaf added to the output of ``jaxpr.eqns[start]``, if a bias."""
  found = _output_add(jaxpr, start, site.output_labels, uses)
  if found is None:
    return None
  add, var, labels = found
  other = add.invars[1] if add.invars[0] is var else add.invars[0]
  if isinstance(other, jax_core.Literal):
    return None
  bias = env.get(other, _CONSTANT)
  if not _may_be_bias(bias, site):
    return None
  paired = _bias_along_outputs(labels, tuple(var.aval.shape),
                               tuple(other.aval.shape), bias.axes)
  if paired is None or not _in_kernel_order(site, *paired, bias.leaf,
                                            leaf_shapes):
    return None
  return bias.leaf


def sub_jaxpr(eqn):
  """The body of a ``jit``, ``remat`` or ``scan`` equation (open jaxpr)."""
  sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
  return getattr(sub, 'jaxpr', sub)


class _Walk:
  """Walks jaxprs, recording layer sites in one :class:`Analysis`.

  ``context`` names the enclosing primitive whose layers cannot be captured
  (``cond``, ``while``, ...), or is ``None``.
  """

  def __init__(self, analysis: Analysis, leaf_shapes, context: str | None):
    self.analysis = analysis
    self.leaf_shapes = leaf_shapes
    self.context = context

  def jaxpr(self, jaxpr, in_values: Sequence[_Value]) -> list[_Value]:
    """Walks ``jaxpr``; returns what is known of its outputs."""
    env: dict[Any, _Value] = dict(zip(jaxpr.invars, in_values))
    read = lambda v: (_CONSTANT if isinstance(v, jax_core.Literal)
                      else env.get(v, _CONSTANT))
    sites = []  # whose bias is looked for once env is complete
    for index, eqn in enumerate(jaxpr.eqns):
      outs, site = self._equation(eqn, [read(v) for v in eqn.invars])
      if site is not None:
        sites.append((index, site))
      env.update(zip(eqn.outvars, outs))
    uses = _uses(jaxpr)
    for index, site in sites:
      site.bias = _find_bias(jaxpr, index, site, env, uses, self.leaf_shapes)
    nested = [sub_jaxpr(e) for e in jaxpr.eqns
              if e.primitive.name in INLINED | REMAT | {_SCAN}]
    if sites or any(id(j) in self.analysis.active for j in nested):
      self.analysis.active.add(id(jaxpr))
    return [read(v) for v in jaxpr.outvars]

  def _equation(self, eqn, values) -> tuple[list[_Value], Site | None]:
    """What is known of the outputs of ``eqn``, and its site if a layer."""
    name = eqn.primitive.name
    if name in _DEVICE_VARYING:
      return list(values), None
    if name in _VIEW_PRIMITIVES and values and values[0].leaf is not None:
      view = _view_rule(eqn, values[0])
      if view is not None:
        return [view], None
      self._count_uses(values)
      return [_derived(values)], None
    if name in INLINED or name in REMAT:
      return self.jaxpr(sub_jaxpr(eqn), values), None
    if name == _SCAN:
      return self._scan(eqn, values), None
    # Direct uses of each leaf (of a view of it) other than by views and
    # calls (whose bodies are counted): a bias must have no use but its add.
    self._count_uses(values)
    if name in (_DOT, _CONV):
      return [_derived(values)], self._layer(eqn, values)
    self._other(eqn, values)
    if name in _INDEXING and values[0].leaf is not None:
      return [_derived(values, _INDEXED)] * len(eqn.outvars), None
    return [_derived(values)] * len(eqn.outvars), None

  def _count_uses(self, values) -> None:
    uses = self.analysis.uses
    for leaf in {v.leaf for v in values if v.leaf is not None}:
      uses[leaf] = uses.get(leaf, 0) + 1

  def _layer(self, eqn, values) -> Site | None:
    """Records a ``dot_general``/``conv_general_dilated`` that is a layer."""
    site_fn = _dot_site if eqn.primitive.name == _DOT else _conv_site
    site = site_fn(eqn, values, self.analysis, self.leaf_shapes)
    if site is None:
      return None
    if self.context is not None:
      self.analysis.reject({site.leaf}, f'used as a kernel inside '
                           f'{self.context}, where statistics are not '
                           'captured')
      return None
    self.analysis.sites[id(eqn)] = site
    if site.sliced:
      self.analysis.sliced.add(site.leaf)
    return site

  def _scan(self, eqn, values) -> list[_Value]:
    """Walks a scan body: closed-over kernels, carries, sliced operands."""
    p = eqn.params
    n_consts, n_carry = p['num_consts'], p['num_carry']
    inner = [
        _derived([v], 'sliced by an outer scan and used in an inner one')
        if v.sliced else v for v in values[:n_consts]]
    inner += [_derived([v]) for v in values[n_consts:n_consts + n_carry]]
    inner += [_slice(v) for v in values[n_consts + n_carry:]]
    self.jaxpr(sub_jaxpr(eqn), inner)
    return [_derived(values)] * len(eqn.outvars)

  def _other(self, eqn, values) -> None:
    """Walks the bodies of other primitives, where layers are refused.

    Operands are passed one to one (``cond``: after the branch index), so
    that kernels inside are recognised, and reported.
    """
    name = eqn.primitive.name
    walk = _Walk(self.analysis, self.leaf_shapes, self.context or f'a {name}')
    for sub in jax_core.jaxprs_in_params(eqn.params):
      body = getattr(sub, 'jaxpr', sub)
      n = len(body.invars)
      if n == len(values):
        sub_in = list(values)
      elif n == len(values) - 1 and name == 'cond':
        sub_in = list(values[1:])
      else:
        sub_in = [_derived(values)] * n
      walk.jaxpr(body, sub_in)


def _found_layers(analysis: Analysis) -> dict[int, FoundLayer]:
  """One layer per kernel leaf whose sites agree, with its own bias."""
  by_leaf: dict[int, list[Site]] = {}
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
    layers[leaf] = FoundLayer(sites[0].spec, bias)
  return layers


def analyse(jaxpr, leaf_shapes: Sequence[tuple[int, ...]],
            num_args: int) -> Analysis:
  """Finds the layers of a jaxpr whose first inputs are parameter leaves.

  Args:
    jaxpr: the (open) jaxpr of ``fn``, whose inputs are the parameter leaves
      then ``num_args`` argument leaves.
    leaf_shapes: the shape of each parameter leaf.
    num_args: how many inputs after them are data (activations).

  Returns:
    The :class:`Analysis`: sites, layers and the reasons for the others.
  """
  analysis = Analysis()
  in_values = [_Value(frozenset({i}), leaf=i, axes=tuple(range(len(s))))
               for i, s in enumerate(leaf_shapes)]
  in_values += [_DATA] * num_args
  _Walk(analysis, leaf_shapes, None).jaxpr(jaxpr, in_values)
  analysis.layers = _found_layers(analysis)
  return analysis
