"""BNP for Flax NNX: collect layer-input statistics in the forward pass."""

from bnp_optax._src.nnx_capture import apply
from bnp_optax._src.nnx_capture import layer_specs
from bnp_optax._src.nnx_capture import register_layer

__all__ = ['apply', 'layer_specs', 'register_layer']
