"""BNP for Flax linen: collect layer-input statistics in the forward pass."""

from bnp_optax._src.linen_capture import apply

__all__ = ['apply']
