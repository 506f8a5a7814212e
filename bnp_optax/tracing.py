"""BNP for any JAX function: layer statistics captured by tracing.

For models written with Equinox, Haiku or plain JAX (and Flax layers that no
integration registers): :func:`layer_specs` finds the layers of
``fn(params, *args)`` for the optimizer, :func:`apply` runs ``fn`` and returns
the input statistics of every layer, :func:`describe` says what BNP does to
each parameter. Never imports Flax, Equinox or Haiku.
"""

from bnp_optax._src.tracing import apply
from bnp_optax._src.tracing import describe
from bnp_optax._src.tracing import layer_specs

__all__ = ['apply', 'describe', 'layer_specs']
