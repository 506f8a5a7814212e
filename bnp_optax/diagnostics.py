"""Hessian conditioning diagnostics: the paper's Figure 8 on your own model.

For one neuron of a Dense layer (one output channel of a Conv layer), the
Hessian of the mini-batch loss with respect to ``[b_i, w_i]``
(Propositions 2 and 9), the same Hessian after BNP's change of variables
(Theorem 3), their condition numbers and ``kappa(D)`` (Theorem 4).
:func:`neuron_hessian` and :func:`neuron_hessian_autodiff` need Flax, which
is imported when one of them is first used; the rest is NumPy.
"""

import importlib

from bnp_optax._src.conditioning import condition_number
from bnp_optax._src.conditioning import Conditioning
from bnp_optax._src.conditioning import conditioning
from bnp_optax._src.conditioning import conv_mean_error_bound
from bnp_optax._src.conditioning import hessian_from_inputs
from bnp_optax._src.conditioning import kappa_d
from bnp_optax._src.conditioning import NeuronHessian
from bnp_optax._src.conditioning import patch_statistics
from bnp_optax._src.conditioning import preconditioner

# Names from bnp_optax._src.linen_hessian, which imports Flax.
_LINEN = ('neuron_hessian', 'neuron_hessian_autodiff')


def __getattr__(name):
  if name in _LINEN:
    module = importlib.import_module('bnp_optax._src.linen_hessian')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_LINEN))


__all__ = [
    'Conditioning',
    'NeuronHessian',
    'condition_number',
    'conditioning',
    'conv_mean_error_bound',
    'hessian_from_inputs',
    'kappa_d',
    'neuron_hessian',  # noqa: F822 (loaded by __getattr__)
    'neuron_hessian_autodiff',  # noqa: F822
    'patch_statistics',
    'preconditioner',
]
