"""Reproduce the BNP paper's experiments: models, data, runs, figures.

Run ``python -m bnp_optax.experiments --help``. Subcommands: ``run`` (methods
x seeds on one model, dataset and batch size), ``suite`` (one of the paper's
comparisons at a chosen scale), ``plot`` (a figure from run JSON files) and
``list`` (methods, models, suites, the paper's learning rates). Needs the
``experiments`` extra: ``pip install 'bnp_optax[experiments]'``.

The pieces are importable for scripts and notebooks: the paper's networks
(:class:`FullyConnected`, :class:`CNN5`, :class:`ResNet`), its loss
(:func:`cross_entropy`) and the data loaders are defined here once and used
by the harness, the examples, the notebooks and the benchmarks.
"""

from bnp_optax.experiments._batch_renorm import BatchRenorm
from bnp_optax.experiments._bn4 import BN4
from bnp_optax.experiments._cli import main
from bnp_optax.experiments._config import Options
from bnp_optax.experiments._data import DataError
from bnp_optax.experiments._data import Dataset
from bnp_optax.experiments._data import load as load_dataset
from bnp_optax.experiments._data import load_digits
from bnp_optax.experiments._methods import default_learning_rate
from bnp_optax.experiments._methods import METHODS
from bnp_optax.experiments._models import CNN5
from bnp_optax.experiments._models import cross_entropy
from bnp_optax.experiments._models import FullyConnected
from bnp_optax.experiments._models import make_model
from bnp_optax.experiments._models import ResNet
from bnp_optax.experiments._plot import conditioning_series
from bnp_optax.experiments._plot import group_results
from bnp_optax.experiments._plot import plot
from bnp_optax.experiments._plot import plot_conditioning
from bnp_optax.experiments._plot import sorted_groups
from bnp_optax.experiments._qscale import q_squared_per_layer
from bnp_optax.experiments._qscale import step_ratio
from bnp_optax.experiments._qscale import undo_q_scaling
from bnp_optax.experiments._results import check_result
from bnp_optax.experiments._results import load_results
from bnp_optax.experiments._suites import SUITES
from bnp_optax.experiments._train import RunConfig
from bnp_optax.experiments._train import train

__all__ = [
    'BN4',
    'BatchRenorm',
    'CNN5',
    'DataError',
    'Dataset',
    'FullyConnected',
    'METHODS',
    'Options',
    'ResNet',
    'RunConfig',
    'SUITES',
    'check_result',
    'conditioning_series',
    'cross_entropy',
    'default_learning_rate',
    'group_results',
    'load_dataset',
    'load_digits',
    'load_results',
    'main',
    'make_model',
    'plot',
    'plot_conditioning',
    'q_squared_per_layer',
    'sorted_groups',
    'step_ratio',
    'train',
    'undo_q_scaling',
]
