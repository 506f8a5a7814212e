"""Collects the input statistics of Flax linen Dense and Conv layers.

The statistics are taken in the user's own forward pass by a method
interceptor (``nn.intercept_methods``): when a ``Dense`` or ``Conv`` module's
``__call__`` runs, the interceptor reduces its input to a
:class:`~bnp_optax.LayerStats` (under ``stop_gradient``) and sows it into a
private collection, which :func:`apply` makes mutable and returns. The model's
code is not changed, no extra forward pass runs and no activation is kept.
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import statistics

COLLECTION = 'bnp_optax_layer_stats'
_SOW_NAME = 'input_stats'


def _module_name(module: nn.Module) -> str:
  return layers_lib.path_to_str(tuple(module.path))


def _first_input(args, kwargs, module) -> jax.Array:
  if args:
    return args[0]
  if 'inputs' in kwargs:
    return kwargs['inputs']
  raise TypeError(
      f'bnp_optax: cannot find the input of layer {_module_name(module)!r} '
      f'({type(module).__name__}); expected it as the first argument or as '
      '`inputs=`.'
  )


def _dense_statistics(module: nn.Dense, x: jax.Array) -> statistics.LayerStats:
  return statistics.input_statistics(
      x, num_batch_axes=x.ndim - 1, positions=1
  )


def _conv_statistics(
    module: nn.Conv, x: jax.Array, y: jax.Array
) -> statistics.LayerStats:
  if module.feature_group_count != 1:
    raise NotImplementedError(
        f'bnp_optax: layer {_module_name(module)!r} is a grouped convolution '
        f'(feature_group_count={module.feature_group_count}), which BNP does '
        'not support yet; exclude it with optax.masked.'
    )
  kernel_size = module.kernel_size
  num_spatial = 1 if isinstance(kernel_size, int) else len(kernel_size)
  num_batch_axes = max(x.ndim - num_spatial - 1, 0)
  positions = math.prod(y.shape[y.ndim - num_spatial - 1 : -1])
  return statistics.input_statistics(
      x, num_batch_axes=num_batch_axes, positions=positions
  )


def _record_input_statistics(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != '__call__' or not isinstance(
      module, (nn.Dense, nn.Conv)
  ):
    return next_fun(*args, **kwargs)
  x = _first_input(args, kwargs, module)
  y = next_fun(*args, **kwargs)
  if module.is_initializing() or not module.is_mutable_collection(COLLECTION):
    return y
  if isinstance(module, nn.Dense):
    stats = _dense_statistics(module, x)
  else:
    stats = _conv_statistics(module, x, y)
  module.sow(COLLECTION, _SOW_NAME, stats)
  return y


def _collect(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Turns the sown collection into ``{name: {...: LayerStats}}``.

  A layer applied several times in one pass sows a tuple of statistics,
  which are merged exactly (see :func:`merge_statistics`).
  """
  result = {}
  for key, value in tree.items():
    if key == _SOW_NAME:
      continue
    result[key] = _collect(value)
  if _SOW_NAME in tree:
    merged = statistics.merge_statistics(tree[_SOW_NAME])
    if result:
      # A Dense/Conv subclass with submodules of its own: keep both.
      raise NotImplementedError(
          'bnp_optax: a Dense/Conv layer with Dense/Conv submodules is not '
          f'supported (submodules {sorted(result)}).'
      )
    return merged
  return result


def apply(
    model: nn.Module,
    variables: Any,
    *args: Any,
    mutable: Any = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
  """Runs ``model.apply`` and returns its output with the layer statistics.

  Use it in place of ``model.apply`` in the loss function; pass the returned
  ``layer_stats`` out as auxiliary output and on to ``tx.update``. It records
  the input statistics of every ``nn.Dense`` and ``nn.Conv`` (and their
  subclasses) called in the forward pass, at the same path as the layer's
  parameters.

  Args:
    model: a Flax linen module, unchanged.
    variables: the variables, as for ``model.apply`` (``{'params': ...}``).
    *args: positional arguments of the model call.
    mutable: as for ``model.apply``. When it is not ``False``, ``output`` is
      ``model.apply``'s pair ``(y, mutated_variables)``.
    **kwargs: other keyword arguments of ``model.apply`` (``rngs``,
      ``method``, ...) and of the model call.

  Returns:
    ``(output, layer_stats)``: what ``model.apply`` would return, and a nested
    dict that mirrors the parameters down to each Dense/Conv layer, whose
    values are :class:`~bnp_optax.LayerStats`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import bnp_optax
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((8, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, layer_stats = bnp_optax.linen.apply(model, variables, x)
    >>> sorted(layer_stats)
    ['layers_0', 'layers_2']
    >>> layer_stats['layers_0'].mean.shape
    (3,)
  """
  if isinstance(variables, Mapping) and COLLECTION in variables:
    raise ValueError(
        f'bnp_optax.linen.apply: variables already hold a {COLLECTION!r} '
        'collection; pass the model variables only.'
    )
  if mutable is True:
    collections = True
  elif mutable is False or mutable is None:
    collections = [COLLECTION]
  elif isinstance(mutable, str):
    collections = [mutable, COLLECTION]
  else:
    collections = list(mutable) + [COLLECTION]
  with nn.intercept_methods(_record_input_statistics):
    output, mutated = model.apply(
        variables, *args, mutable=collections, **kwargs
    )
  mutated = dict(mutated)
  sown = mutated.pop(COLLECTION, {})
  # When the model itself is a Dense/Conv layer this is a bare LayerStats,
  # at the root like its parameters.
  layer_stats = _collect(sown)
  if mutable is False or mutable is None:
    return output, layer_stats
  return (output, mutated), layer_stats
