"""BNP for Flax linen: collect layer-input statistics in the forward pass."""

from bnp_optax._src.linen_capture import apply
from bnp_optax._src.linen_capture import COLLECTION
from bnp_optax._src.linen_capture import layer_specs
from bnp_optax._src.linen_capture import register_layer
from bnp_optax._src.linen_capture import TrainState

__all__ = ['COLLECTION', 'TrainState', 'apply', 'layer_specs', 'register_layer']
