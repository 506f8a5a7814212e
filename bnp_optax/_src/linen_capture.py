"""Collects the input statistics of Flax linen Dense and Conv layers.

The statistics are taken in the user's own forward pass by a method
interceptor (``nn.intercept_methods``): when a registered module's
``__call__`` runs (``Dense``, ``DenseGeneral``, ``Conv`` and their subclasses,
and any type given to :func:`register_layer`), the interceptor reduces its
input to a :class:`~bnp_optax.LayerStats` (under ``stop_gradient``) and sows
it into a private collection, which :func:`apply` makes mutable and returns.
The model's code is not changed, no extra forward pass runs and no activation
is kept.
"""

from collections.abc import Callable, Iterator, Mapping
import contextlib
import functools
import threading
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from bnp_optax._src import capture
from bnp_optax._src import layers as layers_lib
from bnp_optax._src import layout
from bnp_optax._src import statistics

COLLECTION = 'bnp_optax_layer_stats'
_SOW_NAME = 'input_stats'

StatisticsFn = capture.StatisticsFn
SpecFn = capture.SpecFn


def module_name(module: nn.Module) -> str:
  """The path of a bound module, as its parameters' (``'Block_0/Dense_1'``)."""
  return layers_lib.path_to_str(tuple(module.path))


def _dense_general_attributes(module: nn.DenseGeneral):
  batch_dims = module.batch_dims
  if isinstance(batch_dims, int):
    batch_dims = (batch_dims,)
  axis = module.axis
  if isinstance(axis, int):
    axis = (axis,)
  return tuple(axis), tuple(batch_dims)


def _conv_attributes(module: nn.Conv):
  kernel_size = module.kernel_size
  num_spatial = 1 if isinstance(kernel_size, int) else len(kernel_size)
  return num_spatial, module.feature_group_count


_REGISTRY = capture.LayerRegistry(nn.Module, 'linen', module_name)
_REGISTRY.register(nn.Conv, capture.conv_layer(_conv_attributes))
_REGISTRY.register(
    nn.DenseGeneral, capture.dense_general_layer(_dense_general_attributes))
_REGISTRY.register(nn.Dense, capture.dense_layer())
_REGISTRY.register(nn.ConvLocal, _REGISTRY.unsupported(
    'its kernel differs at every position'))
_REGISTRY.register(nn.ConvTranspose, _REGISTRY.unsupported(
    'a transposed convolution sees a zero-dilated input'))


def register_layer(
    module_type: type,
    statistics_fn: StatisticsFn,
    *,
    spec_fn: SpecFn | None = None,
    layout_fn: SpecFn | None = None,
) -> None:
  """Teaches :func:`apply` the input statistics of a module type.

  The module's parameters must be named ``kernel`` (and ``bias``, if any),
  as Flax's own layers name them. ``statistics_fn(module, args, kwargs,
  outputs)`` receives the module and the arguments and result of its
  ``__call__`` and returns the statistics of the input, usually with
  :func:`bnp_optax.input_statistics`, whose ``feature_axes`` say which input
  axes are the fan-in (and ``spec`` which kernel axes they are). The same
  keywords as :func:`bnp_optax.nnx.register_layer`.

  Args:
    module_type: a ``flax.linen.Module`` subclass; registering a type again
      replaces its function. It takes precedence over the built-in types, so
      a subclass of ``nn.Dense`` can be measured differently.
    statistics_fn: computes the :class:`~bnp_optax.LayerStats` of one call.
    spec_fn: optional ``module -> LayerSpec``, the kernel's layout read from
      the module, recorded with the statistics when ``statistics_fn``
      records none (and so given by :func:`layer_specs`); needed only when
      the kernel is not laid out as a Dense ``(n_in, n_out)`` or Conv
      ``(*window, c_in, c_out)`` kernel. Default: that of the registered
      type ``module_type`` derives from, if any.
    layout_fn: the former name of ``spec_fn``.

  Example:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import bnp_optax
    >>> class Affine(nn.Module):  # y = x @ kernel + bias, kernel (n_in, n_out)
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     kernel = self.param('kernel', nn.initializers.lecun_normal(),
    ...                         (x.shape[-1], self.features))
    ...     bias = self.param('bias', nn.initializers.zeros, (self.features,))
    ...     return x @ kernel + bias[None, :]
    >>> bnp_optax.linen.register_layer(
    ...     Affine, lambda module, args, kwargs, outputs:
    ...     bnp_optax.input_statistics(args[0]))
    >>> model = Affine(2)
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> _, layer_stats = bnp_optax.linen.apply(model, variables, x)
    >>> layer_stats['<root>'].mean.shape
    (3,)
  """
  _REGISTRY.register_layer(
      module_type, statistics_fn,
      spec_fn if spec_fn is not None else layout_fn)


def _record_input_statistics(next_fun, args, kwargs, context):
  module = context.module
  layer_type = None
  if context.method_name == '__call__':
    layer_type = _REGISTRY.lookup(module)
  outputs = next_fun(*args, **kwargs)
  if module.is_initializing():
    return outputs
  if layer_type is None:
    if _REGISTRY.lookup(module) is None:
      _record_raw_parameters(module)
    return outputs
  if layer_type.refused is not None:
    _record_note(tuple(module.path), layer_type.note(module, 'linen'))
    return outputs
  if not module.is_mutable_collection(COLLECTION):
    raise ValueError(
        f'bnp_optax: layer {module_name(module)!r} runs inside a lifted '
        'transform (nn.scan, nn.vmap, ...) that does not carry the '
        f'{COLLECTION!r} collection, so its statistics would be lost. Add '
        f"it to the transform's variable_axes as {{{COLLECTION!r}: 0}} "
        '(bnp_optax.linen.COLLECTION), beside the parameters: stacked '
        "parameters (variable_axes={'params': 0, ...}) are then "
        'preconditioned one slice per layer, and parameters shared by every '
        "step (variable_broadcast='params') get the statistics of all the "
        'steps merged, as a layer called several times.'
    )
  _record_kernel_ndim(module)
  module.sow(COLLECTION, _SOW_NAME, layer_type.measure(
      module, args, kwargs, outputs, module_name(module)))
  return outputs


@contextlib.contextmanager
def intercept_layer(
    layer: str, on_call: Callable[[nn.Module, tuple, dict, Any], Any]
) -> Iterator[None]:
  """Lets ``on_call`` see (and replace) the output of one layer's calls.

  Within the context, every ``__call__`` of a module whose path is ``layer``
  (as :func:`module_name` writes it) returns ``on_call(module, args, kwargs,
  outputs)`` instead of ``outputs``; other calls are untouched.

  Args:
    layer: the layer's path, ``'Block_0/Dense_1'``.
    on_call: ``(module, args, kwargs, outputs) -> outputs``.

  Yields:
    Nothing; use it around ``model.apply``.
  """
  def interceptor(next_fun, args, kwargs, context):
    outputs = next_fun(*args, **kwargs)
    if (context.method_name == '__call__'
        and module_name(context.module) == layer):
      return on_call(context.module, args, kwargs, outputs)
    return outputs

  with nn.intercept_methods(interceptor):
    yield


class _Recording:
  """What the forward pass tells besides statistics, while apply() runs.

  Attributes:
    kernel_ndims: ``{layer path: ndim}``, the number of axes of each
      layer's kernel as the layer itself sees it. Inside nn.scan/nn.vmap a
      stacked kernel is seen sliced (fewer axes than in the variables), a
      broadcast one whole.
    notes: ``{path tuple: NotPreconditioned}`` for refused layers and for
      kernel-like parameters of modules that are not registered layers.
  """

  def __init__(self):
    self.kernel_ndims: dict[str, int] = {}
    self.notes: dict[tuple[str, ...], layers_lib.NotPreconditioned] = {}


_recording = threading.local()


def _current() -> _Recording | None:
  return getattr(_recording, 'value', None)


def _record_kernel_ndim(module: nn.Module) -> None:
  current = _current()
  if current is None:
    return
  kernel = module.variables.get('params', {}).get(layers_lib.KERNEL)
  if kernel is not None:
    current.kernel_ndims[module_name(module)] = jnp.ndim(
        nn.meta.unbox(kernel))


def _record_note(path: tuple[str, ...],
                 note: layers_lib.NotPreconditioned) -> None:
  current = _current()
  if current is not None:
    current.notes.setdefault(path, note)


def _record_raw_parameters(module: nn.Module) -> None:
  """Notes the kernel-like parameters of a module that is not a layer.

  A parameter made with ``self.param`` and used with ``jnp.dot`` (the
  ``DotReluDot`` block of Flax's pjit guide) is no registered layer's
  kernel, so nothing measures its input.
  """
  if _current() is None:
    return
  for name, value in module.variables.get('params', {}).items():
    value = nn.meta.unbox(value)
    if (isinstance(value, Mapping) or jnp.ndim(value) < 2
        or not jnp.issubdtype(jnp.result_type(value), jnp.inexact)):
      continue
    kind = type(module).__name__
    _record_note(tuple(module.path) + (name,), layers_lib.NotPreconditioned(
        f'a parameter of {kind}, which is not a registered layer type, so '
        'bnp_optax.linen.apply does not measure its input and its gradient '
        'is left unchanged. If it is used as a kernel (self.param with '
        'jnp.dot, say), bnp_optax.tracing.apply(model.apply, variables, x) '
        'with layer_specs=bnp_optax.tracing.layer_specs(...) preconditions '
        'it (bnp_optax.tracing.describe says how it is used), or register '
        f'{kind} with bnp_optax.linen.register_layer.'))


@contextlib.contextmanager
def _recording_forward_pass() -> Iterator[_Recording]:
  outer = _current()
  _recording.value = _Recording()
  try:
    yield _recording.value
  finally:
    _recording.value = outer


def _with_notes(layer_stats: dict[str, Any],
                notes: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """Adds the notes at their paths, where no statistics are."""
  measured = [() if n == layers_lib.path_to_str(()) else tuple(n.split('/'))
              for n in layer_stats]
  for path, note in sorted(notes.items()):
    if any(path[:len(m)] == m for m in measured):
      continue  # a parameter of a measured layer (a registered type's)
    layer_stats.setdefault(layers_lib.path_to_str(path), note)
  return layer_stats


def _lifted(stats: statistics.LayerStats, name: str, kernel_ndim: int | None,
            inner_ndim: int | None) -> statistics.LayerStats:
  """Statistics sown under nn.scan/nn.vmap, as the layer's parameters are.

  The transform stacks the statistics along one leading axis per lifted
  transform. A kernel stacked the same way (``variable_axes={'params':
  0}``) is one layer per slice (:func:`statistics.unstack`); a kernel
  broadcast to every step (``variable_broadcast='params'``, weight sharing)
  is one layer called at every step, whose statistics are merged exactly
  (:func:`statistics.merge_stacked`).
  """
  lead = stats.count.ndim
  if lead == 0 or kernel_ndim is None or inner_ndim is None:
    return statistics.unstack(stats)
  stacked = kernel_ndim - inner_ndim
  if stacked == 0:
    return statistics.merge_stacked(stats)
  if not 0 < stacked < lead:
    return statistics.unstack(stats)
  raise NotImplementedError(
      f'bnp_optax: layer {name!r} runs inside {lead} nested lifted '
      f'transforms that stack its kernel along {stacked} of them and share '
      'it across the others; only all stacked (variable_axes) or all '
      "shared (variable_broadcast='params') is supported. Use "
      'bnp_optax.tracing.apply(model.apply, variables, x) instead, which '
      'handles both.'
  )


def _collect(
    tree: Mapping[str, Any], params: Any, inner_ndims: Mapping[str, int],
    path: tuple[str, ...] = ()
) -> dict[str, statistics.LayerStats]:
  """Turns the sown collection into ``{layer path: LayerStats}``.

  A layer applied several times in one pass sows a tuple of statistics,
  which are merged exactly (see :func:`merge_statistics`); statistics
  stacked by ``nn.scan``/``nn.vmap`` are one layer a slice, or one layer
  called at every step when the transform broadcasts its kernel (see
  :func:`_lifted`).
  """
  result = {}
  for key, value in tree.items():
    if key != _SOW_NAME:
      result.update(_collect(
          value, params.get(key, {}) if isinstance(params, Mapping) else {},
          inner_ndims, path + (str(key),)))
  if _SOW_NAME in tree:
    if result:
      raise NotImplementedError(
          'bnp_optax: a Dense/Conv layer with Dense/Conv submodules is not '
          f'supported (submodules {sorted(result)}).'
      )
    name = layers_lib.path_to_str(path)
    kernel = (params.get(layers_lib.KERNEL)
              if isinstance(params, Mapping) else None)
    kernel_ndim = None if kernel is None else jnp.ndim(nn.meta.unbox(kernel))
    result[name] = statistics.merge_statistics([
        _lifted(s, name, kernel_ndim, inner_ndims.get(name))
        for s in tree[_SOW_NAME]])
  return result


def _module_of(model: Any) -> tuple[nn.Module, dict[str, Any]]:
  """The module of ``model``, and keywords bound with ``functools.partial``.

  Accepts a linen module, its bound ``model.apply`` (what
  ``flax.training.train_state.TrainState.apply_fn`` holds) and a
  ``functools.partial`` of that with keyword arguments only.
  """
  if isinstance(model, nn.Module):
    return model, {}
  if (isinstance(model, functools.partial) and not model.args
      and _is_module_apply(model.func)):
    return model.func.__self__, dict(model.keywords)
  if _is_module_apply(model):
    return model.__self__, {}
  raise TypeError(
      'bnp_optax.linen.apply: the first argument must be the linen module '
      f'(or its bound method module.apply), got {model!r}. Pass the module, '
      'as bnp_optax.linen.apply(model, variables, x); a TrainState built '
      'with apply_fn=model.apply can pass state.apply_fn.'
  )


def _is_module_apply(fn: Any) -> bool:
  return (isinstance(getattr(fn, '__self__', None), nn.Module)
          and getattr(fn, '__func__', None) is nn.Module.apply)


def apply(
    model: nn.Module | Callable[..., Any],
    variables: Any,
    *args: Any,
    mutable: Any = False,
    axis_name: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
  """Runs ``model.apply`` and returns its output with the layer statistics.

  Use it in place of ``model.apply`` in the loss function; pass the returned
  ``layer_stats`` out as auxiliary output and on to ``tx.update``. It records
  the input statistics of every ``nn.Dense``, ``nn.DenseGeneral`` and
  ``nn.Conv`` (and subclasses, and registered types) called in the forward
  pass, at the same path as the layer's parameters.

  Args:
    model: a Flax linen module, unchanged, or its bound ``model.apply``
      (what ``flax.training.train_state.TrainState.apply_fn`` holds, so
      ``apply(state.apply_fn, ...)`` works), optionally with keyword
      arguments bound by ``functools.partial``.
    variables: the variables, as for ``model.apply`` (``{'params': ...}``).
    *args: positional arguments of the model call.
    mutable: as for ``model.apply``. When it is not ``False``, ``output`` is
      ``model.apply``'s pair ``(y, mutated_variables)``.
    axis_name: inside ``shard_map`` or ``pmap`` with the batch split over
      this mapped axis, combine every device's statistics into those of the
      global batch (see :func:`bnp_optax.all_reduce_statistics`). Not needed
      under ``jax.jit`` with a sharded batch, where the statistics are global
      already.
    **kwargs: other keyword arguments of ``model.apply`` (``rngs``,
      ``method``, ...) and of the model call.

  Returns:
    ``(output, layer_stats)``: what ``model.apply`` would return, and
    ``{layer path: LayerStats}``, keyed as the optimizer's running statistics
    (``'Block_0/Dense_1'``; ``'<root>'`` when the model is the layer), as
    every capture route returns them.

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

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Secs. 3.3 and 4: each layer's input statistics, Eqs. 13 and 21-22).
  """
  model, bound_kwargs = _module_of(model)
  if 'mutable' in bound_kwargs and mutable is False:
    mutable = bound_kwargs['mutable']
  bound_kwargs.pop('mutable', None)
  kwargs = {**bound_kwargs, **kwargs}
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
  with (nn.intercept_methods(_record_input_statistics),
        _recording_forward_pass() as recording):
    output, mutated = model.apply(
        variables, *args, mutable=collections, **kwargs
    )
  mutated = dict(mutated)
  sown = mutated.pop(COLLECTION, {})
  params = (variables.get('params', {}) if isinstance(variables, Mapping)
            else {})
  layer_stats = _with_notes(
      _collect(sown, params, recording.kernel_ndims), recording.notes)
  if axis_name is not None:
    layer_stats = statistics.all_reduce_statistics(layer_stats, axis_name)
  if mutable is False or mutable is None:
    return output, layer_stats
  return (output, mutated), layer_stats


def layer_specs(
    model: nn.Module, variables: Any, *args: Any, **kwargs: Any
) -> dict[str, layout.LayerSpec]:
  """The kernel layout of every measured layer, for ``scale_by_bnp``.

  Needed only for layers whose kernel is not laid out as a plain Dense
  ``(n_in, n_out)`` or Conv ``(*window, c_in, c_out)`` kernel
  (``DenseGeneral`` with several axes or ``batch_dims``, grouped
  convolutions), because the optimizer state is created before any statistic
  is seen. Nothing is computed: the model is only traced (``jax.eval_shape``).

  Args:
    model: the Flax linen module.
    variables: its variables (or their shapes).
    *args: example inputs of the model call (or ``jax.ShapeDtypeStruct``).
    **kwargs: as for :func:`apply`.

  Returns:
    ``{layer path: LayerSpec}``, to pass as ``layer_specs=``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import bnp_optax
    >>> model = nn.DenseGeneral(features=4, axis=(-2, -1))
    >>> x = jnp.ones((8, 3, 2))
    >>> variables = model.init(jax.random.key(0), x)
    >>> specs = bnp_optax.linen.layer_specs(model, variables, x)
    >>> specs['<root>'].fan_in_axes
    (0, 1)
    >>> tx = bnp_optax.bnp(0.1, layer_specs=specs)
  """
  shapes = jax.eval_shape(
      lambda v, *a: apply(model, v, *a, **kwargs)[1], variables, *args
  )
  return {
      name: stats.spec
      for name, stats in layers_lib.flatten_layer_stats(shapes).items()
      if stats.spec is not None
  }


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that forwards ``layer_stats``.

  Flax's ``apply_gradients`` calls ``tx.update(grads, opt_state, params)``
  with no extra arguments, so BNP would never see its statistics. This
  subclass takes them (and any other extra arguments of the optimizer) and
  passes them on.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import bnp_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> state = bnp_optax.linen.TrainState.create(
    ...     apply_fn=model.apply, tx=bnp_optax.bnp(0.1),
    ...     params=model.init(jax.random.key(0), x)['params'])
    >>> def loss_fn(params):
    ...   y, layer_stats = bnp_optax.linen.apply(model, {'params': params}, x)
    ...   return jnp.sum(y ** 2), layer_stats
    >>> grads, layer_stats = jax.grad(loss_fn, has_aux=True)(state.params)
    >>> state = state.apply_gradients(grads=grads, layer_stats=layer_stats)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, layer_stats=None, tx_kwargs=None,
                      **kwargs):
    """Applies one optimizer step.

    Args:
      grads: gradients with the structure of ``params``.
      layer_stats: the statistics from :func:`apply`, passed to ``tx.update``.
      tx_kwargs: other extra keyword arguments for ``tx.update``.
      **kwargs: fields of the state to replace, as in Flax.

    Returns:
      The new state, with ``step`` incremented.
    """
    extra = dict(tx_kwargs or {})
    if layer_stats is not None:
      extra['layer_stats'] = layer_stats
    updates, new_opt_state = self.tx.update(
        grads, self.opt_state, self.params, **extra
    )
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(
        step=self.step + 1, params=new_params, opt_state=new_opt_state,
        **kwargs,
    )
