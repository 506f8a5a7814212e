"""The root conftest's strict settings hold in every test."""

import warnings

import jax
import jax.numpy as jnp
import pytest


def test_rank_promotion_raises_and_eight_devices():
  with pytest.raises(ValueError, match='jax_numpy_rank_promotion'):
    jnp.ones(3) + jnp.ones((2, 3))
  assert jax.device_count() == 8


def test_warnings_are_errors():
  with pytest.raises(UserWarning):
    warnings.warn('strict', UserWarning, stacklevel=1)
