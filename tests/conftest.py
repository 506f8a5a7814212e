"""Strict JAX settings for the whole suite (as optimistix and equinox do)."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')
