"""Collects the input statistics of Flax NNX Linear and Conv layers.

NNX has no method interceptor, so the ``__call__`` of each known layer type
(``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and types given to
:func:`register_layer`) is wrapped once, on first use, by a function that
calls the original and, only while :func:`apply` is collecting on this
thread, records the statistics of the input. Outside :func:`apply` the
wrapper just calls the original method. The statistics are computed in the
user's forward pass under ``stop_gradient``: no extra pass, no stored
activations.
"""

import functools
import threading
from typing import Any

from flax import nnx

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import linen_capture
from bnp_optax._src import registry
from bnp_optax._src import statistics

StatisticsFn = registry.StatisticsFn

_state = threading.local()


def _collector():
  return getattr(_state, 'collector', None)


def _linear(module, args, kwargs, outputs):
  del outputs
  x = linen_capture.first_input(args, kwargs, module)
  return statistics.input_statistics(x, spec=statistics.DENSE)


def _linear_general(module, args, kwargs, outputs):
  del outputs
  x = linen_capture.first_input(args, kwargs, module)
  return linen_capture.dense_general_statistics(
      x, tuple(module.axis), tuple(module.batch_axis.keys())
  )


def _conv(module, args, kwargs, outputs):
  x = linen_capture.first_input(args, kwargs, module)
  return linen_capture.conv_statistics(
      x, outputs, len(module.kernel_size), module.feature_group_count
  )


def _name_of(module) -> str:
  collector = _collector()
  return collector.name_of(module) if collector else type(module).__name__


_REGISTRY = registry.LayerRegistry(nnx.Module, 'nnx', [], _name_of)
_REGISTRY.register(nnx.Conv, _conv)
_REGISTRY.register(nnx.LinearGeneral, _linear_general)
_REGISTRY.register(nnx.Linear, _linear)
_REGISTRY.register(nnx.ConvTranspose, _REGISTRY.unsupported(
    'a transposed convolution sees a zero-dilated input'))
_WRAPPED: set[type] = set()


def _wrap(module_type: type) -> None:
  if module_type in _WRAPPED:
    return
  original = module_type.__call__

  @functools.wraps(original)
  def call(self, *args, **kwargs):
    collector = _collector()
    if collector is None:
      return original(self, *args, **kwargs)
    # A registered subclass calling super().__call__ is recorded once.
    outermost = id(self) not in collector.active
    collector.active.add(id(self))
    try:
      outputs = original(self, *args, **kwargs)
    finally:
      if outermost:
        collector.active.discard(id(self))
    if outermost:
      fn = _REGISTRY.lookup(self)
      if fn is not None:
        collector.record(self, fn(self, args, kwargs, outputs))
    return outputs

  call.__bnp_optax_original__ = original
  module_type.__call__ = call
  _WRAPPED.add(module_type)


def register_layer(module_type: type, statistics_fn: StatisticsFn) -> None:
  """Teaches :func:`apply` the input statistics of an NNX module type.

  The module's parameters must be named ``kernel`` (and ``bias``, if any).
  ``statistics_fn(module, args, kwargs, outputs)`` receives the module and
  the arguments and result of its ``__call__`` and returns the statistics of
  the input, usually with :func:`bnp_optax.input_statistics`.

  Args:
    module_type: an ``nnx.Module`` subclass; it takes precedence over the
      built-in types.
    statistics_fn: computes the :class:`~bnp_optax.LayerStats` of one call.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import bnp_optax
    >>> class Affine(nnx.Module):  # y = x @ kernel + bias
    ...   def __init__(self, n_in, n_out, rngs):
    ...     self.kernel = nnx.Param(
    ...         jax.random.normal(rngs.params(), (n_in, n_out)))
    ...     self.bias = nnx.Param(jnp.zeros(n_out))
    ...   def __call__(self, x):
    ...     return x @ self.kernel[...] + self.bias[...][None, :]
    >>> bnp_optax.nnx.register_layer(
    ...     Affine, lambda module, args, kwargs, outputs:
    ...     bnp_optax.input_statistics(args[0]))
    >>> _, stats = bnp_optax.nnx.apply(Affine(3, 2, nnx.Rngs(0)),
    ...                                jnp.ones((4, 3)))
    >>> stats.mean.shape
    (3,)
  """
  _REGISTRY.register(module_type, statistics_fn)


class _Collector:
  """The statistics of one forward pass, keyed by module path."""

  def __init__(self, model):
    self.paths = {}
    for path, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Module):
        self.paths.setdefault(id(node), tuple(path))
    self.stats: dict[tuple, list[statistics.LayerStats]] = {}
    self.active: set[int] = set()

  def name_of(self, module) -> str:
    path = self.paths.get(id(module))
    if path is None:
      return f'<{type(module).__name__} outside the model>'
    return layers_lib.path_to_str(tuple(str(k) for k in path))

  def record(self, module, stats):
    path = self.paths.get(id(module))
    if path is None:
      raise ValueError(
          f'bnp_optax.nnx.apply: a {type(module).__name__} that is not part '
          'of the model given to apply() was called; its parameters would '
          'have no statistics. Call the layers through the model.'
      )
    if not isinstance(stats, statistics.LayerStats):
      raise TypeError(
          f'bnp_optax: the statistics function for layer '
          f'{self.name_of(module)!r} returned a {type(stats).__name__}, not '
          'a LayerStats.'
      )
    self.stats.setdefault(path, []).append(stats)

  def tree(self):
    if () in self.stats:
      return statistics.merge_statistics(self.stats[()])
    result: dict = {}
    for path, stats in self.stats.items():
      node = result
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = statistics.merge_statistics(stats)
    return result


def apply(
    model: nnx.Module, *args: Any, axis_name: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
  """Calls ``model(*args, **kwargs)`` and returns the layer statistics too.

  Use it in place of ``model(x)`` in the loss function, under ``nnx.grad``,
  ``nnx.value_and_grad`` and ``nnx.jit`` as usual, and pass the statistics
  to the optimizer (``nnx.Optimizer.update`` forwards keyword arguments to
  the transformation). It records the input statistics of every
  ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Conv`` (and registered
  types) called in the forward pass.

  Args:
    model: an NNX module, unchanged.
    *args: its call's positional arguments.
    axis_name: inside ``shard_map``/``pmap`` with the batch split over this
      axis, combine the devices' statistics into the global batch's.
    **kwargs: its call's keyword arguments.

  Returns:
    ``(output, layer_stats)``, where ``layer_stats`` is a nested dict keyed
    like the model's parameter state (``{'layers': {0: LayerStats}}``).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import bnp_optax
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, bnp_optax.bnp(0.1), wrt=nnx.Param)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   def loss_fn(model):
    ...     out, layer_stats = bnp_optax.nnx.apply(model, x)
    ...     return jnp.mean((out - y) ** 2), layer_stats
    ...   (loss, layer_stats), grads = nnx.value_and_grad(
    ...       loss_fn, has_aux=True)(model)
    ...   optimizer.update(model, grads, layer_stats=layer_stats)
    ...   return loss
    >>> loss = train_step(model, optimizer, x, y)
    >>> sorted(optimizer.opt_state[0].running_stats)
    ['layers/0', 'layers/2']

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Secs. 3.3 and 4: each layer's input statistics, Eqs. 13 and 21-22).
  """
  for module_type in _REGISTRY.types:
    _wrap(module_type)
  if _collector() is not None:
    raise RuntimeError('bnp_optax.nnx.apply calls cannot be nested.')
  collector = _Collector(model)
  _state.collector = collector
  try:
    outputs = model(*args, **kwargs)
  finally:
    _state.collector = None
  layer_stats = collector.tree()
  if axis_name is not None:
    layer_stats = statistics.all_reduce_statistics(layer_stats, axis_name)
  return outputs, layer_stats


def layer_specs(model: nnx.Module) -> dict[str, statistics.LayerSpec]:
  """The kernel layout of every built-in layer of ``model``.

  Needed for ``nnx.LinearGeneral`` with several axes or batch axes and for
  grouped ``nnx.Conv``, whose optimizer state must know the layout when it
  is created: ``bnp_optax.bnp(..., layer_specs=bnp_optax.nnx.layer_specs(
  model))``. Read from the modules' attributes; nothing runs.

  Args:
    model: the NNX module.

  Returns:
    ``{layer path: LayerSpec}``.

  Example:
    >>> from flax import nnx
    >>> import bnp_optax
    >>> conv = nnx.Conv(4, 8, (3, 3), feature_group_count=4,
    ...                 rngs=nnx.Rngs(0))
    >>> bnp_optax.nnx.layer_specs(conv)['<root>'].feature_groups
    4
  """
  specs = {}
  for path, node in nnx.iter_graph(model):
    name = layers_lib.path_to_str(tuple(str(k) for k in path))
    if isinstance(node, nnx.ConvTranspose):
      continue
    if isinstance(node, nnx.LinearGeneral):
      specs[name] = statistics.dense_general_spec(
          len(node.batch_axis), len(node.axis))
    elif isinstance(node, nnx.Linear):
      specs[name] = statistics.DENSE
    elif isinstance(node, nnx.Conv):
      specs[name] = statistics.conv_spec(
          len(node.kernel_size) + 2, node.feature_group_count)
  return specs

