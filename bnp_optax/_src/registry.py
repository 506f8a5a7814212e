"""Which module types have measured inputs, and how: one registry a framework.

Framework-free: the linen and NNX integrations each hold a
:class:`LayerRegistry` of their own module types.
"""

from collections.abc import Callable
from typing import Any

from bnp_optax._src import statistics

StatisticsFn = Callable[[Any, tuple, dict, Any], statistics.LayerStats]


class LayerRegistry:
  """Module types and the functions that measure their inputs.

  Lookups go by ``isinstance`` in order, registered types first, so a
  registered subclass takes precedence over a built-in base class.
  """

  def __init__(self, base_type: type, framework: str,
               entries: list[tuple[type, StatisticsFn]],
               name_of: Callable[[Any], str]):
    self._base_type = base_type
    self._framework = framework
    self._entries = list(entries)
    self._name_of = name_of

  def register(self, module_type: type, statistics_fn: StatisticsFn) -> None:
    if not (isinstance(module_type, type)
            and issubclass(module_type, self._base_type)):
      raise TypeError(
          f'register_layer: {module_type!r} is not a '
          f'{self._base_type.__module__}.{self._base_type.__name__} type.'
      )
    self._entries = [(t, f) for t, f in self._entries if t is not module_type]
    self._entries.insert(0, (module_type, statistics_fn))

  def lookup(self, module: Any) -> StatisticsFn | None:
    for module_type, fn in self._entries:
      if isinstance(module, module_type):
        return fn
    return None

  @property
  def types(self) -> list[type]:
    return [t for t, _ in self._entries]

  def unsupported(self, reason: str) -> StatisticsFn:
    """A statistics function that refuses the layer, naming it."""
    def refuse(module, args, kwargs, outputs):
      del args, kwargs, outputs
      raise NotImplementedError(
          f'bnp_optax: layer {self._name_of(module)!r} is a '
          f'{type(module).__name__}, which BNP does not support ({reason}); '
          'exclude it from BNP with optax.masked, or register statistics for '
          f'it with bnp_optax.{self._framework}.register_layer.'
      )
    return refuse
