"""Which parameters BNP preconditions, and how their axes are laid out.

Everything that depends on a kernel's layout lives here, in one place:
:class:`LayerSpec` names the kernel axes that are the convolution window, the
fan-in features (those the statistics are indexed by) and the outputs (those
the bias shares). Layers are found in a parameter tree by their ``kernel``
leaf, as Flax names them; the path of a layer is the path of the mapping that
holds its ``kernel`` (and ``bias``).
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import optax

from bnp_optax._src import statistics

KERNEL = 'kernel'
BIAS = 'bias'
PathTuple = tuple[str, ...]


class LayerSpec(NamedTuple):
  """Layout of a preconditioned layer's kernel.

  Attributes:
    spatial_axes: kernel axes that span the convolution window, ``()`` for a
      Dense layer. A Flax ``Conv`` kernel is ``(*window, c_in, c_out)``, so
      its spatial axes are all but the last two.
    fan_in_axes: kernel axes indexed by input features; the layer's
      statistics have the shape of these axes. ``(0,)`` for a Flax ``Dense``
      kernel ``(n_in, n_out)``; ``(ndim - 2,)`` for a ``Conv`` kernel.

  The remaining axes are output axes; the bias, when there is one, has their
  shape.
  """

  spatial_axes: tuple[int, ...]
  fan_in_axes: tuple[int, ...]

  @property
  def kind(self) -> str:
    return 'conv' if self.spatial_axes else 'dense'

  def output_axes(self, ndim: int) -> tuple[int, ...]:
    taken = set(self.spatial_axes) | set(self.fan_in_axes)
    return tuple(a for a in range(ndim) if a not in taken)


DENSE = LayerSpec(spatial_axes=(), fan_in_axes=(0,))


def conv_spec(kernel_ndim: int) -> LayerSpec:
  """The layout of a Flax ``Conv`` kernel ``(*window, c_in, c_out)``."""
  return LayerSpec(
      spatial_axes=tuple(range(kernel_ndim - 2)),
      fan_in_axes=(kernel_ndim - 2,),
  )


def infer_layer_spec(kernel_shape: tuple[int, ...]) -> LayerSpec | None:
  """Flax's conventions: 2-D kernels are Dense, higher ones Conv."""
  if len(kernel_shape) == 2:
    return DENSE
  if len(kernel_shape) >= 3:
    return conv_spec(len(kernel_shape))
  return None


LayerSpecs = Mapping[str, LayerSpec] | None


def path_to_str(path: PathTuple) -> str:
  return '/'.join(path) if path else '<root>'


def key_to_str(key: Any) -> str:
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
  return tuple(key_to_str(k) for k in key_path)


@dataclasses.dataclass(frozen=True)
class Layer:
  """A preconditioned layer found in a gradient (or parameter) tree."""

  path: PathTuple
  spec: LayerSpec
  kernel_index: int
  bias_index: int | None
  kernel_shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return path_to_str(self.path)

  @property
  def statistics_shape(self) -> tuple[int, ...]:
    return tuple(self.kernel_shape[a] for a in self.spec.fan_in_axes)

  @property
  def fan_in_size(self) -> int:
    """``n_in`` for Dense, ``k^2 c_in`` for a 2-D Conv: rows of ``w_i``."""
    axes = self.spec.spatial_axes + self.spec.fan_in_axes
    return math.prod(self.kernel_shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class ParameterTree:
  """A flattened parameter or gradient tree, with its layers found."""

  leaves: list[Any]
  treedef: Any
  leaf_paths: list[PathTuple]
  layers: dict[str, Layer]
  masked_paths: frozenset[PathTuple]

  def is_masked(self, path: PathTuple) -> bool:
    """Whether ``optax.masked`` excluded the layer at ``path``."""
    return any(path[: len(m)] == m for m in self.masked_paths)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _spec_for(
    name: str, kernel_shape: tuple[int, ...], layer_specs: LayerSpecs
) -> LayerSpec | None:
  if layer_specs is not None and name in layer_specs:
    spec = layer_specs[name]
    ndim = len(kernel_shape)
    axes = spec.spatial_axes + spec.fan_in_axes
    if any(not -ndim <= a < ndim for a in axes):
      raise ValueError(
          f'layer_specs[{name!r}] = {spec} names axes outside the kernel of '
          f'shape {kernel_shape}.'
      )
    return LayerSpec(
        tuple(a % ndim for a in spec.spatial_axes),
        tuple(a % ndim for a in spec.fan_in_axes),
    )
  return infer_layer_spec(kernel_shape)


def parse_tree(tree: Any, layer_specs: LayerSpecs = None) -> ParameterTree:
  """Flattens ``tree`` and finds every layer that BNP would precondition.

  A layer is any mapping with a ``kernel`` leaf of at least two dimensions;
  its ``bias`` leaf, if any, is preconditioned with it. Kernels that
  ``optax.masked`` replaced by ``MaskedNode`` are recorded as masked.

  Args:
    tree: parameters or gradients.
    layer_specs: optional overrides of the inferred :class:`LayerSpec`, keyed
      by layer path (``'Block_0/Dense_1'``).

  Returns:
    The flattened tree and its layers.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked
  )
  leaves = [leaf for _, leaf in flat]
  leaf_paths = [key_path_to_tuple(kp) for kp, _ in flat]
  children: dict[PathTuple, dict[str, int]] = {}
  for index, path in enumerate(leaf_paths):
    if path:
      children.setdefault(path[:-1], {})[path[-1]] = index
  layers = {}
  masked = set()
  for leaf, path in zip(leaves, leaf_paths):
    if _is_masked(leaf):
      masked.add(path[:-1] if path and path[-1] == KERNEL else path)
  for parent, names in children.items():
    if KERNEL not in names:
      continue
    name = path_to_str(parent)
    kernel = leaves[names[KERNEL]]
    if _is_masked(kernel):
      continue
    shape = tuple(getattr(kernel, 'shape', ()))
    spec = _spec_for(name, shape, layer_specs)
    if spec is None:
      continue
    bias_index = names.get(BIAS)
    if bias_index is not None and _is_masked(leaves[bias_index]):
      bias_index = None
    layers[name] = Layer(parent, spec, names[KERNEL], bias_index, shape)
  if layer_specs is not None:
    masked_names = {path_to_str(m) for m in masked}
    unknown = sorted(set(layer_specs) - set(layers) - masked_names)
    if unknown:
      raise ValueError(
          f'layer_specs names layers with no kernel in the parameters: '
          f'{unknown}. Layer paths look like {sorted(layers)[:3]}.'
      )
  return ParameterTree(
      leaves, treedef, leaf_paths, layers, frozenset(masked)
  )


def flatten_layer_stats(
    layer_stats: Any,
) -> dict[str, statistics.LayerStats]:
  """``{layer path: LayerStats}`` from the nested tree the integrations return."""
  is_stats = lambda x: isinstance(x, statistics.LayerStats)
  flat = jax.tree_util.tree_flatten_with_path(layer_stats, is_leaf=is_stats)[0]
  result = {}
  for key_path, leaf in flat:
    name = path_to_str(key_path_to_tuple(key_path))
    if not is_stats(leaf):
      raise TypeError(
          f'layer_stats[{name!r}] is a {type(leaf).__name__}, not a '
          'bnp_optax.LayerStats; pass the layer_stats returned by '
          'bnp_optax.linen.apply unchanged.'
      )
    result[name] = leaf
  return result


def match_statistics(
    tree: ParameterTree,
    stats: Mapping[str, statistics.LayerStats],
) -> None:
  """Raises if statistics and preconditioned layers do not correspond.

  Every layer needs statistics whose shape is the kernel's fan-in shape, and
  every statistic needs a layer (or a layer that ``optax.masked`` excluded).
  """
  missing = sorted(set(tree.layers) - set(stats))
  if missing:
    shapes = {n: tree.layers[n].kernel_shape for n in missing}
    raise ValueError(
        'scale_by_bnp: no statistics in layer_stats for the layers '
        f'{missing} (kernel shapes {shapes}). Every parameter subtree with a '
        "'kernel' is preconditioned: collect its input statistics (e.g. run "
        'the model with bnp_optax.linen.apply), or exclude it from BNP with '
        'optax.masked / optax.partition.'
    )
  orphans = sorted(
      name
      for name in set(stats) - set(tree.layers)
      if not tree.is_masked(tuple(name.split('/')))
  )
  if orphans:
    raise ValueError(
        f'scale_by_bnp: layer_stats has statistics for {orphans}, but the '
        "gradients have no 'kernel' at those paths. Known layers: "
        f'{sorted(tree.layers)}.'
    )
  for name, layer in tree.layers.items():
    s = stats[name]
    expected = layer.statistics_shape
    for field in ('mean', 'variance'):
      got = tuple(getattr(s, field).shape)
      if got != expected:
        raise ValueError(
            f'scale_by_bnp: layer {name!r}: statistics {field} has shape '
            f'{got} but its {layer.spec.kind} kernel of shape '
            f'{layer.kernel_shape} has fan-in shape {expected}. If this layer '
            'is not laid out as Flax Dense/Conv, give its LayerSpec in '
            'layer_specs.'
        )
    for field in ('count', 'batch_size', 'positions'):
      if getattr(s, field).shape != ():
        raise ValueError(
            f'scale_by_bnp: layer {name!r}: statistics {field} must be a '
            f'scalar, got shape {getattr(s, field).shape}.'
        )
    if layer.bias_index is not None:
      bias_shape = tuple(getattr(tree.leaves[layer.bias_index], 'shape', ()))
      out_shape = tuple(
          layer.kernel_shape[a]
          for a in layer.spec.output_axes(len(layer.kernel_shape))
      )
      if bias_shape != out_shape:
        raise ValueError(
            f'scale_by_bnp: layer {name!r}: bias shape {bias_shape} does not '
            f'match the output axes {out_shape} of its kernel '
            f'{layer.kernel_shape}.'
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
      they are checked against the parameters and a mismatch raises the same
      error as ``update`` would.
    layer_specs: the ``layer_specs`` given to :func:`scale_by_bnp`, if any.

  Returns:
    A dict from each parameter's path (``'Dense_0/kernel'``) to one of
    ``'dense kernel'``, ``'dense bias'``, ``'conv kernel'``, ``'conv bias'``,
    ``'masked'`` (excluded by ``optax.masked``) or ``'pass-through'``
    (unchanged: no statistic covers it, e.g. LayerNorm scales or embeddings).

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> params = {'Dense_0': {'kernel': jnp.zeros((3, 2)), 'bias': jnp.zeros(2)},
    ...           'LayerNorm_0': {'scale': jnp.ones(2)}}
    >>> for path, role in bnp_optax.describe_coverage(params).items():
    ...   print(f'{path}: {role}')
    Dense_0/bias: dense bias
    Dense_0/kernel: dense kernel
    LayerNorm_0/scale: pass-through
  """
  tree = parse_tree(params, layer_specs)
  if layer_stats is not None:
    match_statistics(tree, flatten_layer_stats(layer_stats))
  roles = {}
  for layer in tree.layers.values():
    roles[layer.kernel_index] = f'{layer.spec.kind} kernel'
    if layer.bias_index is not None:
      roles[layer.bias_index] = f'{layer.spec.kind} bias'
  result = {}
  for index, path in enumerate(tree.leaf_paths):
    if _is_masked(tree.leaves[index]):
      role = 'masked'
    else:
      role = roles.get(index, 'pass-through')
    result[path_to_str(path)] = role
  return result

