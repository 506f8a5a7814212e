"""BNP for Flax linen: collect layer-input statistics in the forward pass."""

from bnp_optax._src.linen_capture import apply
from bnp_optax._src.linen_capture import layer_specs
from bnp_optax._src.linen_capture import register_layer

__all__ = ['apply', 'layer_specs', 'register_layer']
