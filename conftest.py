"""Strict settings for every test and doctest, in one place.

- 8 fake CPU devices, so multi-device code is tested. The flag must be set
  before JAX starts its backend, hence this root-level conftest (loaded before
  any test module or doctest imports jax).
- Rank promotion raises (``jax_numpy_rank_promotion='raise'``), as optimistix
  and equinox test.
- Warnings are errors: ``filterwarnings = ["error"]`` in pyproject.toml.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG)

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_numpy_rank_promotion', 'raise')
