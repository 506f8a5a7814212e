"""Framework-free capture: which layer types are measured, and how.

A layer type is measured by two functions of the module (a Flax linen or NNX
layer, or any object a framework integration hands over):

- its *statistics function* ``statistics_fn(module, args, kwargs, outputs)``
  reduces the input of one call to a :class:`~bnp_optax.LayerStats`;
- its *spec function* ``spec_fn(module)`` gives the kernel's
  :class:`~bnp_optax.LayerSpec` (the layout of its axes) without running the
  layer (``None`` when it cannot be told before the call, or the layer is
  refused).

Both come from the same attributes of the module, so the spec recorded with
the statistics and the one given to the optimizer up front agree. The
functions here know nothing of Flax: the linen and NNX integrations
(``linen_capture``, ``nnx_capture``) each hold a :class:`LayerRegistry` of
their module types, built from :func:`dense_layer`, :func:`dense_general_layer`
and :func:`conv_layer` with a function that reads the framework's attribute
names. The input statistics of the built-in layer kinds,
:func:`dense_statistics`, :func:`dense_general_statistics` and
:func:`conv_statistics`, take arrays and plain integers only, for any way of
finding a layer's input (interceptors, patched methods, traced jaxprs).
"""

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

import jax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import layout
from bnp_optax._src import statistics

StatisticsFn = Callable[[Any, tuple, dict, Any], statistics.LayerStats]
SpecFn = Callable[[Any], layout.LayerSpec | None]


# ------------------------------------------------- framework-free statistics


def first_input(args: tuple, kwargs: dict, module: Any) -> jax.Array:
  """The layer input: the first positional argument, or ``inputs=``."""
  if args:
    return args[0]
  if 'inputs' in kwargs:
    return kwargs['inputs']
  raise TypeError(
      f'bnp_optax: cannot find the input of layer {module!r}; expected it as '
      'the first argument or as `inputs=`.'
  )


def dense_statistics(x: jax.Array) -> statistics.LayerStats:
  """Statistics of a Dense input ``(..., n_in)``, kernel ``(n_in, n_out)``.

  Args:
    x: the layer input; every axis but the last is a batch axis.

  Returns:
    Per-feature mean and variance over the batch axes (Eq. 13).
  """
  return statistics.input_statistics(x, spec=layout.DENSE)


def dense_general_statistics(
    x: jax.Array, axis: int | Sequence[int], batch_dims: Sequence[int]
) -> statistics.LayerStats:
  """Statistics of a DenseGeneral/LinearGeneral input.

  Args:
    x: the layer input.
    axis: the contracted input axes (negative counts from the end).
    batch_dims: the input axes that the kernel has too (its independent
      axes; negative counts from the end).

  Returns:
    Mean and variance per feature of ``batch_dims + axis``, over the other
    axes of ``x``.
  """
  axis = tuple(a % x.ndim for a in (axis if isinstance(axis, (tuple, list))
                                    else (axis,)))
  batch_dims = tuple(a % x.ndim for a in batch_dims)
  return statistics.input_statistics(
      x,
      feature_axes=batch_dims + axis,
      spec=layout.dense_general_spec(len(batch_dims), len(axis)),
  )


def conv_statistics(
    x: jax.Array, y: jax.Array, num_spatial: int, feature_groups: int
) -> statistics.LayerStats:
  """Statistics of a convolution's input, per channel over batch and space.

  Args:
    x: the input ``(*batch, *spatial, c_in)`` (a missing batch axis is
      allowed, as Flax allows it).
    y: the output, whose spatial size is the number of kernel positions
      (Eqs. 21-22 average over the positions the kernel is applied at).
    num_spatial: the number of spatial axes.
    feature_groups: ``feature_group_count``.

  Returns:
    Per-channel mean and variance of ``x``.
  """
  num_batch_axes = max(x.ndim - num_spatial - 1, 0)
  positions = math.prod(y.shape[y.ndim - num_spatial - 1 : -1])
  return statistics.input_statistics(
      x,
      batch_axes=tuple(range(num_batch_axes)),
      positions=positions,
      spec=layout.conv_spec(num_spatial + 2, feature_groups),
  )


# ------------------------------------------------------------- layer types


@dataclasses.dataclass(frozen=True)
class LayerType:
  """How one module type is measured.

  Attributes:
    statistics_fn: ``statistics_fn(module, args, kwargs, outputs)``, the
      input statistics of one call.
    spec_fn: ``spec_fn(module)``, the kernel's spec read from the module's
      attributes, or ``None`` when the spec is known only from the
      statistics (a registered type without a spec function) or the type
      is refused. ``nnx.layer_specs`` reads it from the model's modules;
      ``linen.layer_specs`` traces the model instead (linen modules exist
      only inside ``apply``) and reads the ``spec`` recorded with the
      statistics, which :meth:`measure` takes from ``spec_fn`` when the
      statistics function records none.
    refused: why the type is not preconditioned, or ``None``. A refused
      layer is passed through: the integrations record a
      :class:`~bnp_optax.NotPreconditioned` note for it instead of
      statistics (``statistics_fn`` then raises if called).
  """

  statistics_fn: StatisticsFn
  spec_fn: SpecFn | None = None
  refused: str | None = None

  def note(self, module: Any, framework: str) -> Any:
    """The ``NotPreconditioned`` note of a refused layer."""
    return layers_lib.NotPreconditioned(
        f'a {type(module).__name__}, which BNP does not precondition '
        f'({self.refused}); its gradient is left unchanged. To precondition '
        f'it, register statistics for it with bnp_optax.{framework}.'
        'register_layer.')

  def measure(self, module: Any, args: tuple, kwargs: dict, outputs: Any,
              name: str) -> statistics.LayerStats:
    """The statistics of one call, checked, with the kernel's spec.

    Args:
      module: the layer.
      args: the positional arguments of its call.
      kwargs: the keyword arguments of its call.
      outputs: what the call returned.
      name: the layer's path, for error messages.

    Returns:
      The :class:`~bnp_optax.LayerStats` of the call.

    Raises:
      TypeError: the statistics function returned something else.
      ValueError: its recorded spec and ``spec_fn``'s disagree.
    """
    stats = checked(self.statistics_fn(module, args, kwargs, outputs), name)
    if self.spec_fn is None:
      return stats
    spec = self.spec_fn(module)
    if spec is None:
      return stats
    if stats.spec is None:
      return stats.replace(spec=spec)
    if stats.spec != spec:
      raise ValueError(
          f'bnp_optax: layer {name!r}: its statistics record the spec '
          f'{stats.spec} but spec_fn gives {spec}; they must agree '
          "(register_layer's spec_fn defaults to that of the registered type "
          'the module derives from).'
      )
    return stats


def dense_layer() -> LayerType:
  """A Dense/Linear layer: kernel ``(n_in, n_out)``."""
  def statistics_fn(module, args, kwargs, outputs):
    del outputs
    return dense_statistics(first_input(args, kwargs, module))
  return LayerType(statistics_fn, lambda module: layout.DENSE)


def dense_general_layer(
    attributes: Callable[[Any], tuple[Sequence[int], Sequence[int]]],
) -> LayerType:
  """A DenseGeneral/LinearGeneral layer.

  Args:
    attributes: ``module -> (axis, batch_dims)``, read from the framework's
      attribute names.

  Returns:
    The :class:`LayerType`.
  """
  def statistics_fn(module, args, kwargs, outputs):
    del outputs
    axis, batch_dims = attributes(module)
    return dense_general_statistics(
        first_input(args, kwargs, module), axis, batch_dims)

  def spec_fn(module):
    axis, batch_dims = attributes(module)
    return layout.dense_general_spec(len(batch_dims), len(axis))

  return LayerType(statistics_fn, spec_fn)


def conv_layer(attributes: Callable[[Any], tuple[int, int]]) -> LayerType:
  """A convolution.

  Args:
    attributes: ``module -> (num_spatial, feature_groups)``.

  Returns:
    The :class:`LayerType`.
  """
  def statistics_fn(module, args, kwargs, outputs):
    num_spatial, feature_groups = attributes(module)
    return conv_statistics(
        first_input(args, kwargs, module), outputs, num_spatial,
        feature_groups)

  def spec_fn(module):
    num_spatial, feature_groups = attributes(module)
    return layout.conv_spec(num_spatial + 2, feature_groups)

  return LayerType(statistics_fn, spec_fn)


class LayerRegistry:
  """Module types of one framework and how each is measured.

  Lookups go by ``isinstance``, the most recently registered type first, so
  a registered subclass takes precedence over a built-in base class.
  """

  def __init__(self, base_type: type, framework: str,
               name_of: Callable[[Any], str]):
    """Makes an empty registry.

    Args:
      base_type: the framework's module base class; only its subclasses can
        be registered.
      framework: ``'linen'`` or ``'nnx'``, for error messages.
      name_of: ``module -> path string``, for error messages.
    """
    self._base_type = base_type
    self._framework = framework
    self._name_of = name_of
    self._entries: list[tuple[type, LayerType]] = []

  def register(self, module_type: type, layer_type: LayerType) -> None:
    """Adds ``module_type`` (first in lookup order), replacing an entry."""
    if not (isinstance(module_type, type)
            and issubclass(module_type, self._base_type)):
      raise TypeError(
          f'register_layer: {module_type!r} is not a '
          f'{self._base_type.__module__}.{self._base_type.__name__} type.'
      )
    self._entries = [(t, e) for t, e in self._entries if t is not module_type]
    self._entries.insert(0, (module_type, layer_type))

  def lookup(self, module: Any) -> LayerType | None:
    """The entry of the first registered type ``module`` is an instance of."""
    for module_type, layer_type in self._entries:
      if isinstance(module, module_type):
        return layer_type
    return None

  def register_layer(self, module_type: type, statistics_fn: StatisticsFn,
                     spec_fn: SpecFn | None) -> None:
    """What the integrations' ``register_layer`` does.

    Args:
      module_type: the module type.
      statistics_fn: its statistics function.
      spec_fn: its spec function; ``None`` for that of the registered type
        ``module_type`` derives from, if any.
    """
    if spec_fn is None:
      spec_fn = self.spec_fn_of_type(module_type)
    self.register(module_type, LayerType(statistics_fn, spec_fn))

  def spec_fn_of_type(self, module_type: type) -> SpecFn | None:
    """The spec function of the registered base class of ``module_type``."""
    for registered, layer_type in self._entries:
      if isinstance(module_type, type) and issubclass(module_type, registered):
        return layer_type.spec_fn
    return None

  @property
  def types(self) -> list[type]:
    return [t for t, _ in self._entries]

  def unsupported(self, reason: str) -> LayerType:
    """A refused layer type: passed through with ``reason``, no spec."""
    def refuse(module, args, kwargs, outputs):
      del args, kwargs, outputs
      raise NotImplementedError(
          f'bnp_optax: layer {self._name_of(module)!r} is a '
          f'{type(module).__name__}, which BNP does not support ({reason}); '
          'exclude it from BNP with optax.masked, or register statistics for '
          f'it with bnp_optax.{self._framework}.register_layer.'
      )
    return LayerType(refuse, None, reason)


def checked(stats: Any, name: str) -> statistics.LayerStats:
  """Raises unless a statistics function returned a ``LayerStats``."""
  if not isinstance(stats, statistics.LayerStats):
    raise TypeError(
        f'bnp_optax: the statistics function for layer {name!r} returned a '
        f'{type(stats).__name__}, not a LayerStats.'
    )
  return stats
