"""bnp_optax: Batch Normalization Preconditioning for JAX and Optax.

The optax side (this module) never imports Flax; ``bnp_optax.linen`` and
``bnp_optax.nnx`` hold the Flax integrations, ``bnp_optax.tracing`` the
capture for any JAX function (Equinox, Haiku, plain JAX) and
``bnp_optax.diagnostics`` the condition-number tools, each imported on first
use.
"""

import importlib

from bnp_optax._src.accumulate import AccumulatedStats
from bnp_optax._src.accumulate import BNPMultiStepsState
from bnp_optax._src.accumulate import multi_steps
from bnp_optax._src.alias import bnp
from bnp_optax._src.layers import describe_coverage
from bnp_optax._src.layers import LeafLayer
from bnp_optax._src.layers import NotPreconditioned
from bnp_optax._src.layout import LayerSpec
from bnp_optax._src.statistics import all_reduce_statistics
from bnp_optax._src.statistics import input_statistics
from bnp_optax._src.statistics import LayerStats
from bnp_optax._src.statistics import merge_statistics
from bnp_optax._src.transform import RunningStats
from bnp_optax._src.transform import scale_by_bnp
from bnp_optax._src.transform import ScaleByBNPState

__version__ = '0.1.0'

_LAZY_SUBMODULES = ('diagnostics', 'linen', 'nnx', 'tracing')


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'AccumulatedStats',
    'BNPMultiStepsState',
    'LayerSpec',
    'LayerStats',
    'LeafLayer',
    'NotPreconditioned',
    'RunningStats',
    'ScaleByBNPState',
    'all_reduce_statistics',
    'bnp',
    'describe_coverage',
    'input_statistics',
    'merge_statistics',
    'multi_steps',
    'scale_by_bnp',
]
