"""Reproduce the BNP paper's experiments: models, data, runs, figures.

Run ``python -m bnp_optax.experiments --help``. Subcommands: ``run`` (methods
x seeds on one model, dataset and batch size), ``suite`` (one of the paper's
comparisons at a chosen scale), ``plot`` (a figure from run JSON files) and
``list`` (methods, models, suites, the paper's learning rates). Needs the
``experiments`` extra: ``pip install 'bnp_optax[experiments]'``.

The pieces are importable for scripts and notebooks: the paper's networks
(:class:`FullyConnected`, :class:`CNN5`, :class:`ResNet`), its loss
(:func:`cross_entropy`) and the data loaders are defined here once and used
by the harness, the examples, the notebooks and the benchmarks. Only the
names exported here are for use outside this package.

Adding a model: write its linen module in ``_models.py`` (taking ``norm``,
``num_classes`` and ``train``, normalising with ``make_norm``), a builder
``build(norm, num_classes, options)`` and one ``Model`` entry in
``_models.MODELS`` saying whether it has convolutions (one step per
compiled call on CPU), whether ``--checkpoint auto`` saves its runs and
whether Figure 8's diagnostics apply. A new builder option goes in
``_models.ModelOptions`` and its run field in ``_config.RunConfig``.
Adding a method: one ``Method`` entry in ``_methods.METHODS`` (its
normalisation, whether BNP preconditions, its default base optimizer, the
method whose paper rate it borrows, its colour); a new base optimizer is one
entry ``name: build(learning_rate, config)`` in ``_methods.OPTIMIZERS``.
The CLI, the run identity's choices, ``list``, the figures and the training
loop read both tables; the paper's rates, where it has some, go in
``_methods.LEARNING_RATES``, and a comparison of methods in
``_suites.SUITES``. ``tests/test_experiments_api.py`` checks every entry.
"""

from bnp_optax.experiments._batch_renorm import BatchRenorm
from bnp_optax.experiments._bn4 import BN4
from bnp_optax.experiments._cli import main
from bnp_optax.experiments._config import Options
from bnp_optax.experiments._data import DataError
from bnp_optax.experiments._data import Dataset
from bnp_optax.experiments._data import load as load_dataset
from bnp_optax.experiments._data import load_digits
from bnp_optax.experiments._data import subset as subset_dataset
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
from bnp_optax.experiments._sweep import diverged
from bnp_optax.experiments._sweep import select_best
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
    'diverged',
    'group_results',
    'load_dataset',
    'load_digits',
    'load_results',
    'main',
    'make_model',
    'plot',
    'plot_conditioning',
    'q_squared_per_layer',
    'select_best',
    'sorted_groups',
    'step_ratio',
    'subset_dataset',
    'train',
    'undo_q_scaling',
]
