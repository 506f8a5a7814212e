"""Which parameters BNP preconditions, and how their axes are laid out.

Everything that depends on a kernel's layout goes through
:class:`~bnp_optax.LayerSpec`. Layers are found in a parameter tree by their
``kernel`` leaf, as Flax names them; the path of a layer is the path of the
mapping that holds its ``kernel`` (and ``bias``), written ``'Block_0/Dense_1'``.

Trees that do not follow Flax's naming (Equinox modules, Haiku dicts, plain
pytrees) describe their layers explicitly instead: ``layer_specs`` maps the
path of each kernel *leaf* (``'layers/0/weight'``) to a :class:`LeafLayer`
(its layout and the path of its bias leaf), as
``bnp_optax.tracing.layer_specs`` finds them. Then exactly the listed layers
are preconditioned and nothing is inferred from names.
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import optax

from bnp_optax._src import layout
from bnp_optax._src import statistics
from bnp_optax._src.layout import LayerSpec

KERNEL = 'kernel'
BIAS = 'bias'
PathTuple = tuple[str, ...]


class LeafLayer(NamedTuple):
  """A layer given by the path of its kernel leaf, in any parameter tree.

  The values of ``layer_specs`` that ``bnp_optax.tracing.layer_specs``
  returns, keyed by the kernel leaf's path (``'layers/0/weight'``,
  ``'w1'``, ``'mlp/~/linear_0/w'``). When ``layer_specs`` holds these, the
  layers are exactly the listed ones (no ``kernel`` naming is assumed) and
  ``layer_stats`` is keyed by the same paths.

  Attributes:
    spec: the layout of the kernel leaf's axes.
    bias: the path of the leaf added to the layer's output (broadcast along
      the output features), or ``None``. It may hold size-1 axes (an
      Equinox ``Conv2d`` bias is ``(c_out, 1, 1)``); its elements are in the
      order of the kernel's independent and output axes.

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> params = {'w': jnp.zeros((2, 3)), 'b': jnp.zeros(2)}  # y = w @ x + b
    >>> specs = {'w': bnp_optax.LeafLayer(
    ...     bnp_optax.LayerSpec(spatial_axes=(), fan_in_axes=(1,)), bias='b')}
    >>> bnp_optax.describe_coverage(params, layer_specs=specs)
    {'b': 'dense bias', 'w': 'dense kernel'}
  """

  spec: LayerSpec
  bias: str | None = None


LayerSpecs = Mapping[str, LayerSpec | LeafLayer] | None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NotPreconditioned:
  """A parameter the capture saw but does not precondition, and why.

  The Flax integrations put it in ``layer_stats`` where a layer (or a
  kernel-like parameter) has no statistics: at a refused layer's path
  (``nn.ConvTranspose``), or at the path of a parameter used outside a
  registered layer (``self.param`` with ``jnp.dot``). It has no arrays, so
  it passes through ``jit``, ``grad(has_aux=True)`` and collectives
  unchanged. ``scale_by_bnp`` leaves such a layer's gradient unchanged and
  :func:`describe_coverage` reports ``'pass-through: <reason>'``.

  Attributes:
    reason: why, and what would precondition it.
  """

  reason: str

_LAYOUT_HINT = (
    'Kernels that are not laid out as a Flax Dense (n_in, n_out) or Conv '
    '(*window, c_in, c_out) kernel (DenseGeneral/LinearGeneral with several '
    'axes, grouped convolutions) need their layout when the optimizer is '
    'created: scale_by_bnp(layer_specs=bnp_optax.linen.layer_specs(model, '
    'variables, x)) or layer_specs=bnp_optax.nnx.layer_specs(model).'
)


def path_to_str(path: PathTuple) -> str:
  return '/'.join(path) if path else '<root>'


def _key_to_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def key_path_to_tuple(key_path) -> PathTuple:
  """Path of strings; the ``.value`` of an NNX ``Variable`` is dropped."""
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and (
      keys[-1].name == 'value'
  ):
    keys = keys[:-1]
  return tuple(_key_to_str(k) for k in keys)


@dataclasses.dataclass(frozen=True)
class Layer:
  """A preconditioned layer found in a gradient (or parameter) tree."""

  spec: LayerSpec
  kernel_index: int
  bias_index: int | None
  kernel_shape: tuple[int, ...]
  explicit_spec: bool = False
  leaf_layer: bool = False


@dataclasses.dataclass(frozen=True)
class ParameterTree:
  """A flattened parameter or gradient tree, with its layers found."""

  leaves: list[Any]
  treedef: Any
  leaf_paths: list[PathTuple]
  layers: dict[str, Layer]
  masked_paths: frozenset[PathTuple]
  masked_leaves: frozenset[str] = frozenset()

  def is_masked(self, path: PathTuple) -> bool:
    """Whether ``optax.masked`` excluded the layer at ``path``."""
    return any(path[: len(m)] == m for m in self.masked_paths)

  def is_masked_name(self, name: str) -> bool:
    """Same, for a layer name (a kernel leaf's path for leaf layers)."""
    return name in self.masked_leaves or self.is_masked(tuple(name.split('/')))


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def check_unique_names(key_paths, what: str = 'parameters') -> None:
  """Raises if two key paths are written as the same ``'a/b'`` name.

  Layers, statistics and roles are keyed by the ``'/'``-joined path, so a
  dict key holding ``'/'`` (``'a/w'``) beside a nested dict
  (``{'a': {'w': ...}}``) would make two parameters one name.
  """
  seen = {}
  for key_path in key_paths:
    name = path_to_str(key_path_to_tuple(key_path))
    if name in seen:
      raise ValueError(
          f'bnp_optax: the {what} {jax.tree_util.keystr(seen[name])} and '
          f'{jax.tree_util.keystr(key_path)} are both named {name!r} (paths '
          "are written with '/' between keys, so a key that holds '/' can "
          'name the same path as nested keys). Rename one of them.'
      )
    seen[name] = key_path


def parse_tree(tree: Any, layer_specs: LayerSpecs = None) -> ParameterTree:
  """Flattens ``tree`` and finds every layer that BNP would precondition.

  A layer is any mapping with a ``kernel`` leaf of at least two dimensions;
  its ``bias`` leaf, if any, is preconditioned with it. Kernels that
  ``optax.masked`` replaced by ``MaskedNode`` are recorded as masked.

  Args:
    tree: parameters or gradients (NNX ``State`` of ``Variable``s too).
    layer_specs: optional overrides of the inferred :class:`LayerSpec`, keyed
      by layer path (``'Block_0/Dense_1'``); or :class:`LeafLayer` values
      keyed by kernel leaf path, which list every layer explicitly.

  Returns:
    The flattened tree and its layers.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked
  )
  check_unique_names([kp for kp, _ in flat])
  leaves = [leaf for _, leaf in flat]
  leaf_paths = [key_path_to_tuple(kp) for kp, _ in flat]
  masked = frozenset(
      path[:-1] if path and path[-1] == KERNEL else path
      for leaf, path in zip(leaves, leaf_paths) if _is_masked(leaf))
  if layer_specs is not None and any(
      isinstance(v, LeafLayer) for v in layer_specs.values()):
    return _parse_leaf_layers(leaves, treedef, leaf_paths, layer_specs,
                              masked)
  layers = _kernel_layers(leaves, leaf_paths, layer_specs)
  if layer_specs is not None:
    masked_names = {path_to_str(m) for m in masked}
    unknown = sorted(set(layer_specs) - set(layers) - masked_names)
    if unknown:
      raise ValueError(
          f'layer_specs names layers with no kernel in the parameters: '
          f'{unknown}. Layer paths look like {sorted(layers)[:3]}.'
      )
  return ParameterTree(leaves, treedef, leaf_paths, layers, masked)


def _kernel_layers(leaves, leaf_paths, layer_specs) -> dict[str, Layer]:
  """The layers of a tree named as Flax names them, by the ``kernel`` leaf."""
  children: dict[PathTuple, dict[str, int]] = {}
  for index, path in enumerate(leaf_paths):
    if path:
      children.setdefault(path[:-1], {})[path[-1]] = index
  layers = {}
  for parent, names in children.items():
    if KERNEL not in names or _is_masked(leaves[names[KERNEL]]):
      continue
    name = path_to_str(parent)
    shape = tuple(getattr(leaves[names[KERNEL]], 'shape', ()))
    explicit = layer_specs is not None and name in layer_specs
    if explicit:
      spec = layout.check_spec(name, layer_specs[name], shape)
    else:
      spec = layout.infer_layer_spec(shape)
    if spec is None:
      continue
    bias_index = names.get(BIAS)
    if bias_index is not None and _is_masked(leaves[bias_index]):
      bias_index = None
    layers[name] = Layer(spec, names[KERNEL], bias_index, shape, explicit)
  return layers


def _parse_leaf_layers(leaves, treedef, leaf_paths, layer_specs,
                       masked) -> ParameterTree:
  """``parse_tree`` for layers given as ``{kernel leaf path: LeafLayer}``."""
  not_leaf = sorted(
      n for n, v in layer_specs.items() if not isinstance(v, LeafLayer))
  if not_leaf:
    raise TypeError(
        f'layer_specs mixes LeafLayer values with others (at {not_leaf}); '
        'give every layer as a LeafLayer keyed by its kernel leaf path.'
    )
  index = {path_to_str(p): i for i, p in enumerate(leaf_paths)}
  masked_leaves = frozenset(
      path_to_str(p) for leaf, p in zip(leaves, leaf_paths) if _is_masked(leaf))
  named = [(n, v.bias) for n, v in layer_specs.items()]
  unknown = sorted(
      p for n, b in named for p in (n, b) if p is not None and p not in index)
  if unknown:
    raise ValueError(
        f'layer_specs names leaves that are not in the parameters: {unknown}. '
        f'Leaf paths look like {sorted(index)[:3]}.'
    )
  biases = [b for _, b in named if b is not None]
  reused = sorted({b for b in biases if biases.count(b) > 1 or b in
                   layer_specs})
  if reused:
    raise ValueError(
        f'layer_specs gives {reused} as the bias of several layers, or as '
        'the bias of one layer and the kernel of another.'
    )
  layers = {}
  for name, (spec, bias) in layer_specs.items():
    kernel = leaves[index[name]]
    if _is_masked(kernel):
      continue
    shape = tuple(getattr(kernel, 'shape', ()))
    spec = layout.check_spec(name, spec, shape)
    bias_index = None if bias is None else index[bias]
    if bias_index is not None and _is_masked(leaves[bias_index]):
      bias_index = None
    layers[name] = Layer(spec, index[name],
                         bias_index, shape, explicit_spec=True,
                         leaf_layer=True)
  return ParameterTree(leaves, treedef, leaf_paths, layers, masked,
                       masked_leaves)


def _is_stats_or_note(x) -> bool:
  return isinstance(x, (statistics.LayerStats, NotPreconditioned))


def not_preconditioned(layer_stats: Any) -> dict[str, str]:
  """``{path: reason}`` of the :class:`NotPreconditioned` in ``layer_stats``."""
  if isinstance(layer_stats, NotPreconditioned):
    return {path_to_str(()): layer_stats.reason}
  flat = jax.tree_util.tree_flatten_with_path(
      layer_stats, is_leaf=_is_stats_or_note)[0]
  return {path_to_str(key_path_to_tuple(kp)): leaf.reason
          for kp, leaf in flat if isinstance(leaf, NotPreconditioned)}


def flatten_layer_stats(
    layer_stats: Any,
) -> dict[str, statistics.LayerStats]:
  """``{layer path: LayerStats}`` from the ``layer_stats`` given to update.

  Every capture route returns this flat dict already; a tree nested by path
  (``{'Block_0': {'Dense_1': stats}}``) or, for a model that is one layer, a
  bare ``LayerStats`` (``'<root>'``) is flattened to it.

  :class:`NotPreconditioned` entries are left out (see
  :func:`not_preconditioned`).
  """
  is_stats = lambda x: isinstance(x, statistics.LayerStats)
  flat = jax.tree_util.tree_flatten_with_path(
      layer_stats, is_leaf=_is_stats_or_note)[0]
  check_unique_names([kp for kp, _ in flat], 'statistics')
  result = {}
  for key_path, leaf in flat:
    name = path_to_str(key_path_to_tuple(key_path))
    if isinstance(leaf, NotPreconditioned):
      continue
    if not is_stats(leaf):
      raise TypeError(
          f'layer_stats[{name!r}] is a {type(leaf).__name__}, not a '
          'bnp_optax.LayerStats; pass the layer_stats returned by '
          'bnp_optax.linen.apply (or bnp_optax.nnx.apply) unchanged.'
      )
    result[name] = leaf
  return result


def match_statistics(
    tree: ParameterTree,
    stats: Mapping[str, statistics.LayerStats],
    passed: Mapping[str, str] | None = None,
) -> dict[str, LayerSpec]:
  """Pairs statistics with preconditioned layers; raises if they disagree.

  Every layer needs statistics whose shape fits its kernel, or a
  :class:`NotPreconditioned` note in ``passed``, and every statistic needs a
  layer (or a layer that ``optax.masked`` excluded). The layout recorded
  with the statistics (by the integration that measured the layer) takes
  precedence over the one inferred from the kernel's shape.

  Args:
    tree: the parsed gradients or parameters.
    stats: ``{layer path: LayerStats}``.
    passed: ``{path: reason}`` of the layers the capture refused
      (:func:`not_preconditioned`); they get no layout.

  Returns:
    ``{layer path: LayerSpec}``, the layout to precondition each layer with.
  """
  passed = passed or {}
  missing = sorted(set(tree.layers) - set(stats) - set(passed))
  if missing:
    shapes = {n: tree.layers[n].kernel_shape for n in missing}
    raise ValueError(
        'scale_by_bnp: no statistics in layer_stats for the layers '
        f'{missing} (kernel shapes {shapes}). Every parameter subtree with a '
        "'kernel' is preconditioned: collect its input statistics (run the "
        'model with bnp_optax.linen.apply or bnp_optax.nnx.apply; layer '
        'types they do not know can be registered with register_layer), or '
        'exclude it from BNP with optax.masked / optax.partition.'
    )
  orphans = sorted(
      name
      for name in set(stats) - set(tree.layers)
      if not tree.is_masked_name(name)
  )
  if orphans:
    raise ValueError(
        f'scale_by_bnp: layer_stats has statistics for {orphans}, but the '
        "gradients have no 'kernel' at those paths. Known layers: "
        f'{sorted(tree.layers)}. Statistics from bnp_optax.tracing.apply '
        'need layer_specs=bnp_optax.tracing.layer_specs(fn, params, ...) '
        'when the optimizer is created.'
    )
  specs = {}
  for name, layer in tree.layers.items():
    if name not in stats:
      continue  # refused by the capture: passed through
    s = stats[name]
    spec = layer.spec
    if s.spec is not None:
      measured = layout.check_spec(name, s.spec, layer.kernel_shape)
      if layer.explicit_spec and measured != spec:
        raise ValueError(
            f'scale_by_bnp: layer {name!r}: layer_specs gives {spec} but the '
            f'layer was measured as {measured}.'
        )
      spec = measured
    _check_statistics_shapes(name, s, spec, layer.kernel_shape)
    if layer.bias_index is not None:
      _check_bias_shape(name, tree.leaves[layer.bias_index], spec, layer)
    specs[name] = spec
  return specs


def _check_statistics_shapes(name: str, s: statistics.LayerStats,
                             spec: LayerSpec, kernel_shape) -> None:
  """Raises unless ``s`` has the fan-in shape of the kernel and scalars."""
  expected = spec.statistics_shape(kernel_shape)
  for field in ('mean', 'variance'):
    got = tuple(getattr(s, field).shape)
    if got != expected:
      raise ValueError(
          f'scale_by_bnp: layer {name!r}: statistics {field} has shape '
          f'{got} but its {spec.kind} kernel of shape '
          f'{kernel_shape} has fan-in shape {expected}. '
          + _LAYOUT_HINT
      )
  for field in ('count', 'batch_size', 'positions'):
    if getattr(s, field).shape != ():
      raise ValueError(
          f'scale_by_bnp: layer {name!r}: statistics {field} must be a '
          f'scalar, got shape {getattr(s, field).shape}.'
      )


def _check_bias_shape(name: str, bias: Any, spec: LayerSpec,
                      layer: Layer) -> None:
  """Raises unless ``bias`` spans the kernel's output axes."""
  bias_shape = tuple(getattr(bias, 'shape', ()))
  want = spec.bias_shape(layer.kernel_shape)
  if layer.leaf_layer:
    # A leaf layer's bias may hold size-1 axes: (c_out, 1, 1).
    mismatch = math.prod(bias_shape) != math.prod(want)
  else:
    mismatch = bias_shape != want
  if mismatch:
    raise ValueError(
        f'scale_by_bnp: layer {name!r}: bias shape {bias_shape} does not '
        f'match the output axes {want} of its kernel '
        f'{layer.kernel_shape}.'
    )


def state_mismatch_message(name, state_shape, spec, kernel_shape) -> str:
  return (
      f'scale_by_bnp: layer {name!r}: the optimizer state holds statistics '
      f'of shape {tuple(state_shape)}, but the layer, a {spec.kind} kernel '
      f'{tuple(kernel_shape)} laid out as {spec}, needs '
      f'{spec.statistics_shape(kernel_shape)}. ' + _LAYOUT_HINT
  )


def describe_coverage(
    params: Any,
    layer_stats: Any = None,
    *,
    layer_specs: LayerSpecs = None,
) -> dict[str, str]:
  """Lists what BNP does to each parameter.

  Args:
    params: the parameter tree, as given to ``tx.init``.
    layer_stats: optional statistics, as given to ``tx.update``; when given,
      they are checked against the parameters (a mismatch raises the same
      error as ``update`` would) and their recorded layouts are used.
    layer_specs: the ``layer_specs`` given to :func:`scale_by_bnp`, if any.

  Returns:
    A dict from each parameter's path (``'Dense_0/kernel'``) to one of
    ``'dense kernel'``, ``'dense bias'``, ``'conv kernel'``, ``'conv bias'``,
    ``'masked'`` (excluded by ``optax.masked``), ``'pass-through'``
    (unchanged: no statistic covers it, e.g. LayerNorm scales) or
    ``'pass-through: <reason>'`` where ``layer_stats`` holds a
    :class:`NotPreconditioned` note for it (a refused layer, a parameter
    used outside a registered layer).

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> params = {
    ...     'Dense_0': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)},
    ...     'LayerNorm_0': {'scale': jnp.ones(2)}}
    >>> for path, role in bnp_optax.describe_coverage(params).items():
    ...   print(f'{path}: {role}')
    Dense_0/bias: dense bias
    Dense_0/kernel: dense kernel
    LayerNorm_0/scale: pass-through
  """
  tree = parse_tree(params, layer_specs)
  specs = {name: layer.spec for name, layer in tree.layers.items()}
  passed = {}
  if layer_stats is not None:
    passed = not_preconditioned(layer_stats)
    specs = match_statistics(tree, flatten_layer_stats(layer_stats), passed)
  roles = {}
  for name, layer in tree.layers.items():
    if name in passed:
      note = f'pass-through: {passed[name]}'
      roles[layer.kernel_index] = note
      if layer.bias_index is not None:
        roles[layer.bias_index] = note
      continue
    kind = specs[name].kind
    roles[layer.kernel_index] = f'{kind} kernel'
    if layer.bias_index is not None:
      roles[layer.bias_index] = f'{kind} bias'
  leaf_index = {path_to_str(p): i for i, p in enumerate(tree.leaf_paths)}
  for name, reason in passed.items():
    if name in leaf_index and leaf_index[name] not in roles:
      roles[leaf_index[name]] = f'pass-through: {reason}'
  result = {}
  for index, path in enumerate(tree.leaf_paths):
    if _is_masked(tree.leaves[index]):
      role = 'masked'
    else:
      role = roles.get(index, 'pass-through')
    result[path_to_str(path)] = role
  return result
