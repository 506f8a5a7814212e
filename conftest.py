"""Runs every test with 8 fake CPU devices, so multi-device code is tested.

The flag must be set before JAX starts its backend, hence this root-level
conftest (loaded before any test module or doctest imports jax).
"""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG)
