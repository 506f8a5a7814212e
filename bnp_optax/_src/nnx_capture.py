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


def _own_kernel_ndim(module) -> int | None:
  """How many axes a built-in layer's kernel has when it is not stacked."""
  if isinstance(module, nnx.LinearGeneral):
    features = module.out_features
    features = (features,) if isinstance(features, int) else features
    return len(module.batch_axis) + len(module.axis) + len(features)
  if isinstance(module, nnx.Conv):
    return len(module.kernel_size) + 2
  if isinstance(module, nnx.Linear):
    return 2
  return None


def _stacked_axes(module) -> int:
  """The leading axes ``nnx.vmap`` stacked on a layer's kernel, if any.

  Flax's scan-over-layers pattern builds ``n`` blocks at once with
  ``nnx.vmap``: their ``nnx.Linear`` holds one ``(n, n_in, n_out)``
  kernel, each slice a layer of its own.
  """
  kernel = getattr(module, 'kernel', None)
  own = _own_kernel_ndim(module)
  if kernel is None or own is None:
    return 0
  return max(len(kernel.shape) - own, 0)


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
    self.notes: dict[tuple, layers_lib.NotPreconditioned] = {}
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
          'have no statistics. Either the layer is held outside the model '
          '(call it through the model), or an NNX transform (nnx.scan, '
          'nnx.vmap, nnx.remat...) inside the model hands it to its function '
          "as a copy. bnp_optax.nnx follows the copies only of layers "
          "stacked by nnx.vmap (Flax's scan-over-layers pattern); for "
          'others, use the tracing route: graphdef, params, rest = '
          'nnx.split(model, nnx.Param, ...); fn = lambda p, x: '
          'nnx.merge(graphdef, p, rest)(x); then bnp_optax.tracing.apply(fn, '
          'params, x) with layer_specs=bnp_optax.tracing.layer_specs(fn, '
          'params, x).'
      )
    if layer_type.refused is not None:
      self.notes.setdefault(path, layer_type.note(module, 'nnx'))
      return
    stats = layer_type.measure(module, args, kwargs, outputs,
                               self.name_of(module))
    self.stats.setdefault(path, []).append(stats)

  def layer_stats(self) -> dict[str, Any]:
    """``{layer path: LayerStats}``, every layer's calls merged, and notes."""
    result = {
        layers_lib.path_to_str(tuple(str(k) for k in path)):
            statistics.merge_statistics(stats)
        for path, stats in self.stats.items()
    }
    for path, note in self.notes.items():
      result.setdefault(layers_lib.path_to_str(tuple(str(k) for k in path)),
                        note)
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
  types) called in the forward pass. Layers stacked by ``nnx.vmap`` and run
  by ``nnx.scan`` (Flax's scan-over-layers pattern) are one layer per slice,
  as in the unrolled model: such a model is run through
  :func:`bnp_optax.tracing.apply` on ``nnx.split(model)``, since the
  transforms call copies of the layers.

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
  if any(_REGISTRY.lookup(node) is not None and _stacked_axes(node)
         for _, node in nnx.iter_graph(model)):
    outputs, layer_stats = _apply_by_tracing(model, args, kwargs)
  else:
    outputs, layer_stats = _apply_by_patching(model, args, kwargs)
  if axis_name is not None:
    layer_stats = statistics.all_reduce_statistics(layer_stats, axis_name)
  return outputs, layer_stats


def _apply_by_patching(model, args, kwargs):
  """The statistics of each registered layer, as its ``__call__`` sees them."""
  collector = _Collector(model)
  with _patch_layer_calls():
    _state.collector = collector
    try:
      outputs = model(*args, **kwargs)
    finally:
      _state.collector = None
  return outputs, collector.layer_stats()


def _apply_by_tracing(model, args, kwargs):
  """The statistics of a model with stacked layers, found by tracing it.

  Stacked layers are called by NNX transforms (``nnx.scan`` over the
  stack), which hand copies of them to their function, where no patched
  ``__call__`` can record for the model. The model is split into its
  parameters and the rest, and ``bnp_optax.tracing.apply`` runs it as a
  function of them: a kernel sliced by the scan is one layer per slice, as
  in the unrolled model. The statistics are keyed by module path like the
  other layers', the rest of the state (RNG counts, batch statistics) is
  written back to ``model``.
  """
  from bnp_optax._src import tracing  # pylint: disable=g-import-not-at-top

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fn(params, rest, *args, **kwargs):
    copy = nnx.merge(graphdef, params, rest)
    outputs = copy(*args, **kwargs)
    return outputs, nnx.split(copy, nnx.Param, ...)[2]

  (outputs, new_rest), found = tracing.apply(fn, params, rest, *args,
                                             **kwargs)
  nnx.update(model, new_rest)
  modules = {layers_lib.path_to_str(tuple(str(k) for k in path)): node
             for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)}
  layer_stats = {}
  for name, stats in found.items():
    parent, _, leaf = name.rpartition('/')
    layer = parent or layers_lib.path_to_str(())
    module = modules.get(layer)
    layer_type = None if module is None else _REGISTRY.lookup(module)
    if leaf != layers_lib.KERNEL or layer_type is None:
      layer_stats[name] = layers_lib.NotPreconditioned(
          'used as a kernel outside a registered layer, which bnp_optax.nnx '
          'does not precondition (bnp_optax.tracing.apply on nnx.split(model)'
          ' would)')
    elif layer_type.refused is not None:
      layer_stats[layer] = layer_type.note(module, 'nnx')
    else:
      layer_stats[layer] = stats
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
      spec = layout.stacked_spec(spec, _stacked_axes(node))
      specs[layers_lib.path_to_str(tuple(str(k) for k in path))] = spec
  return specs
