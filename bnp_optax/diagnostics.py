"""Hessian conditioning diagnostics: the paper's Figure 8 on your own model.

For one neuron of a Dense layer (one output channel of a Conv layer), the
Hessian of the mini-batch loss with respect to ``[b_i, w_i]``
(Propositions 2 and 9), the same Hessian after BNP's change of variables
(Theorem 3), their condition numbers and ``kappa(D)`` (Theorem 4). Needs
Flax for :func:`neuron_hessian`; the rest is NumPy.
"""

from bnp_optax._src.diagnostics import condition_number
from bnp_optax._src.diagnostics import Conditioning
from bnp_optax._src.diagnostics import conditioning
from bnp_optax._src.diagnostics import conv_mean_error_bound
from bnp_optax._src.diagnostics import hessian_from_inputs
from bnp_optax._src.diagnostics import kappa_d
from bnp_optax._src.diagnostics import neuron_hessian
from bnp_optax._src.diagnostics import neuron_hessian_autodiff
from bnp_optax._src.diagnostics import NeuronHessian
from bnp_optax._src.diagnostics import patch_statistics
from bnp_optax._src.diagnostics import preconditioner

__all__ = [
    'Conditioning',
    'NeuronHessian',
    'condition_number',
    'conditioning',
    'conv_mean_error_bound',
    'hessian_from_inputs',
    'kappa_d',
    'neuron_hessian',
    'neuron_hessian_autodiff',
    'patch_statistics',
    'preconditioner',
]
