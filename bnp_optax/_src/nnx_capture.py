"""Collects the input statistics of Flax NNX Linear and Conv layers.

NNX has no method interceptor, so while :func:`apply` runs, the ``__call__``
of each registered layer type (``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv`` and types given to :func:`register_layer`) is replaced by a
function that calls the original and records the statistics of the input;
the original methods are put back when the last :func:`apply` running in the
process returns, as ``nnx.capture`` does. A thread that calls a model
outside :func:`apply` while another thread is inside it goes through the
replacement, which then only calls the original (it records for the thread
whose :func:`apply` is running). The statistics are computed in the user's
forward pass under ``stop_gradient``: no extra pass, no stored activations.
"""

from collections.abc import Iterator
import contextlib
import functools
import threading
from typing import Any

from flax import nnx

from bnp_optax._src import capture
from bnp_optax._src import layers as layers_lib
from bnp_optax._src import layout
from bnp_optax._src import statistics

StatisticsFn = capture.StatisticsFn
SpecFn = capture.SpecFn

_state = threading.local()


def _collector():
  return getattr(_state, 'collector', None)


def _name_of(module) -> str:
  collector = _collector()
  return collector.name_of(module) if collector else type(module).__name__


def _linear_general_attributes(module: nnx.LinearGeneral):
  return tuple(module.axis), tuple(module.batch_axis.keys())


def _conv_attributes(module: nnx.Conv):
  return len(module.kernel_size), module.feature_group_count


_REGISTRY = capture.LayerRegistry(nnx.Module, 'nnx', _name_of)
_REGISTRY.register(nnx.Conv, capture.conv_layer(_conv_attributes))
_REGISTRY.register(nnx.LinearGeneral,
                   capture.dense_general_layer(_linear_general_attributes))
_REGISTRY.register(nnx.Linear, capture.dense_layer())
_REGISTRY.register(nnx.ConvTranspose, _REGISTRY.unsupported(
    'a transposed convolution sees a zero-dilated input'))

# The classes whose ``__call__`` is replaced, with what their own
# ``__dict__`` held before (``_INHERITED`` if they inherited ``__call__``),
# and how many apply() calls, in any thread, are running.
_INHERITED = object()
_patch_lock = threading.Lock()
_patched: dict[type, Any] = {}
_patch_depth = 0


def _recording_call(original):
  """``__call__`` that records statistics while this thread collects."""

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
      layer_type = _REGISTRY.lookup(self)
      if layer_type is not None:
        collector.record(self, layer_type, args, kwargs, outputs)
    return outputs

  return call


@contextlib.contextmanager
def _patch_layer_calls() -> Iterator[None]:
  """Replaces the registered types' ``__call__`` while any apply() runs."""
  global _patch_depth
  with _patch_lock:
    for module_type in _REGISTRY.types:
      if module_type not in _patched:
        _patched[module_type] = module_type.__dict__.get(
            '__call__', _INHERITED)
        module_type.__call__ = _recording_call(module_type.__call__)
    _patch_depth += 1
  try:
    yield
  finally:
    with _patch_lock:
      _patch_depth -= 1
      if not _patch_depth:
        # Newest first, so a subclass patched over its patched base is undone
        # before the base.
        for module_type, own in reversed(list(_patched.items())):
          if own is _INHERITED:
            del module_type.__call__
          else:
            module_type.__call__ = own
        _patched.clear()


def register_layer(
    module_type: type,
    statistics_fn: StatisticsFn,
    *,
    spec_fn: SpecFn | None = None,
    layout_fn: SpecFn | None = None,
) -> None:
  """Teaches :func:`apply` the input statistics of an NNX module type.

  The module's parameters must be named ``kernel`` (and ``bias``, if any).
  ``statistics_fn(module, args, kwargs, outputs)`` receives the module and
  the arguments and result of its ``__call__`` and returns the statistics of
  the input, usually with :func:`bnp_optax.input_statistics`. The same
  keywords as :func:`bnp_optax.linen.register_layer`.

  Args:
    module_type: an ``nnx.Module`` subclass; it takes precedence over the
      built-in types.
    statistics_fn: computes the :class:`~bnp_optax.LayerStats` of one call.
    spec_fn: optional ``module -> LayerSpec``, the kernel's layout read from
      the module, for :func:`layer_specs` (and recorded with the statistics
      when ``statistics_fn`` records none); needed only when the kernel is
      not laid out as a Dense ``(n_in, n_out)`` or Conv ``(*window, c_in,
      c_out)`` kernel. It must agree with the ``spec`` of the statistics.
      Default: that of the registered type ``module_type`` derives from
      (``nnx.LinearGeneral``'s for a subclass of it), if any.
    layout_fn: the former name of ``spec_fn``.

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
    >>> _, layer_stats = bnp_optax.nnx.apply(Affine(3, 2, nnx.Rngs(0)),
    ...                                      jnp.ones((4, 3)))
    >>> layer_stats['<root>'].mean.shape
    (3,)
  """
  _REGISTRY.register_layer(
      module_type, statistics_fn,
      spec_fn if spec_fn is not None else layout_fn)


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

  def record(self, module, layer_type: capture.LayerType, args, kwargs,
             outputs) -> None:
    path = self.paths.get(id(module))
    if path is None:
      raise ValueError(
          f'bnp_optax.nnx.apply: a {type(module).__name__} that is not part '
          'of the model given to apply() was called; its parameters would '
          'have no statistics. Call the layers through the model.'
      )
    stats = layer_type.measure(module, args, kwargs, outputs,
                               self.name_of(module))
    self.stats.setdefault(path, []).append(stats)

  def layer_stats(self) -> dict[str, statistics.LayerStats]:
    """``{layer path: LayerStats}``, every layer's calls merged."""
    return {
        layers_lib.path_to_str(tuple(str(k) for k in path)):
            statistics.merge_statistics(stats)
        for path, stats in self.stats.items()
    }


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
    ``(output, layer_stats)``, where ``layer_stats`` is ``{layer path:
    LayerStats}``, keyed as the optimizer's running statistics
    (``'layers/0'``; ``'<root>'`` when the model is the layer), as every
    capture route returns them.

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
  if _collector() is not None:
    raise RuntimeError('bnp_optax.nnx.apply calls cannot be nested.')
  collector = _Collector(model)
  with _patch_layer_calls():
    _state.collector = collector
    try:
      outputs = model(*args, **kwargs)
    finally:
      _state.collector = None
  layer_stats = collector.layer_stats()
  if axis_name is not None:
    layer_stats = statistics.all_reduce_statistics(layer_stats, axis_name)
  return outputs, layer_stats


def layer_specs(model: nnx.Module) -> dict[str, layout.LayerSpec]:
  """The kernel layout of every measured layer of ``model``.

  Needed for ``nnx.LinearGeneral`` with several axes or batch axes, for
  grouped ``nnx.Conv`` and for registered types with a ``spec_fn``, whose
  optimizer state must know the layout when it is created:
  ``bnp_optax.bnp(..., layer_specs=bnp_optax.nnx.layer_specs(model))``. Read
  from the modules' attributes by each registered type's spec function;
  nothing runs.

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
    layer_type = _REGISTRY.lookup(node)
    if layer_type is None or layer_type.spec_fn is None:
      continue
    spec = layer_type.spec_fn(node)
    if spec is not None:
      specs[layers_lib.path_to_str(tuple(str(k) for k in path))] = spec
  return specs
