"""The methods compared, their base optimizers and the paper's rates.

:data:`METHODS` is the method table and :data:`OPTIMIZERS` the table of
base optimizers; :data:`LEARNING_RATES` holds the paper's Tables 2 and 3.
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import optax

from bnp_optax.experiments import _models
from bnp_optax.experiments import _modern


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: a normalisation layer and whether BNP is used.

  Attributes:
    name: the name used on the command line and in results.
    label: the name used in figures.
    norm: the model's normalisation, see ``_models.NORMS``.
    bnp: precondition the gradients with BNP (the model's statistics are
      captured in the training step and passed to the optimizer).
    optimizer: the base optimizer (a key of :data:`OPTIMIZERS`) when the
      run gives none (``RunConfig``'s ``optimizer=None``): the paper's, SGD
      except for BN with 4 Things, which it trains with Adam (Section 5.2,
      Appendix B).
    rate_from: the method whose rate in the paper's tables this one takes
      where the tables have none for it (see :func:`default_learning_rate`).
    graft: BNP with ``graft=True`` (not in the paper): each layer's step
      has the length of its raw gradient, so the rate is the base
      optimizer's own (``docs/howto/learning_rate.md``).
    colour: its colour in figures; None: the next of a cycle.
    arch: another architecture of the model (``_normfree.py``): ``'gn_ws'``
      (GroupNorm + Weight Standardization) or ``'nf'`` (normaliser-free);
      None: the model as the paper builds it, with ``norm``.
    bnp_variant: ``'full'`` (the paper's BNP) or ``'centring'`` (its
      centring alone, ``_modern.scale_by_bnp_centring``; an experiment-only
      control for the BNP + Adam study).
    clip: ``'agc'``: adaptive gradient clipping before the optimizer (the
      normaliser-free networks' training, Brock et al. 2021b).
  """

  name: str
  label: str
  norm: str
  bnp: bool
  optimizer: str = 'sgd'
  rate_from: str | None = None
  graft: bool = False
  colour: str | None = None
  arch: str | None = None
  bnp_variant: str = 'full'
  clip: str | None = None

  @property
  def conv_bias(self) -> bool:
    """Whether the ResNets' convolutions get a bias.

    Yes for BNP (which centres with it), without a normalisation and with
    LN; BN and GN follow each convolution with their own offset.
    """
    return self.bnp or self.norm in ('none', 'ln')


# The method table. Adding a method is one entry here (and, for a new base
# optimizer, one in OPTIMIZERS below); the CLI, the run identity's choices,
# `list`, the figures' labels and the training step read this table.
METHODS = {
    m.name: m for m in (
        Method('vanilla', 'Vanilla', 'none', False, colour='#1f77b4'),
        Method('bn', 'BN', 'bn', False, colour='#d62728'),
        Method('renorm', 'BN Renorm', 'renorm', False, rate_from='bn',
               colour='#9467bd'),
        Method('ln', 'LN', 'ln', False, rate_from='bn', colour='#2ca02c'),
        Method('gn', 'GN', 'gn', False, rate_from='bn', colour='#8c564b'),
        Method('bnp', 'BNP', 'none', True, colour='#ff7f0e'),
        Method('bnp_gn', 'BNP+GN', 'gn', True, colour='#e377c2'),
        Method('bnp_graft', 'BNP graft', 'none', True, rate_from='vanilla',
               graft=True, colour='#bcbd22'),
        # Summers and Dinneen (2020), see _bn4.py.
        Method('bn4', 'BN w/ 4 Things', 'bn4', False, optimizer='adam',
               colour='#17becf'),
        # AdamW (decoupled weight decay, --weight-decay) and BNP chained
        # before it: the Transformer comparison (docs/transformers.md) and
        # today's methods (docs/comparison.md, _modern.py, _normfree.py).
        Method('adamw', 'AdamW', 'none', False, optimizer='adamw',
               colour='#2ca02c'),
        Method('bnp_adamw', 'BNP+AdamW', 'none', True, optimizer='adamw',
               colour='#9467bd'),
        Method('centring_adamw', 'BNP centring+AdamW', 'none', True,
               optimizer='adamw', bnp_variant='centring', colour='#aec7e8'),
        Method('muon', 'Muon', 'none', False, optimizer='muon',
               colour='#000000'),
        Method('kfac', 'K-FAC', 'none', False, optimizer='kfac'),
        Method('gn_ws', 'GN+WS', 'gn', False, rate_from='bn', arch='gn_ws',
               colour='#c49c94'),
        Method('nf_agc', 'NF+AGC', 'none', False, arch='nf', clip='agc',
               colour='#98df8a'),
    )
}

# The base optimizers: ``build(learning_rate, config)`` with the rate a
# float or an optax schedule and ``config`` the run's ``RunConfig`` (for
# its fields, e.g. ``momentum``). A run chains [weight decay], [BNP], then
# this (see ``_train.make_optimizer``).
OPTIMIZERS: dict[str, Callable[[Any, Any], optax.GradientTransformation]] = {
    'sgd': lambda learning_rate, config: optax.sgd(learning_rate),
    'momentum': lambda learning_rate, config: optax.sgd(
        learning_rate, momentum=config.momentum),
    'adam': lambda learning_rate, config: optax.adam(learning_rate),
    # Decoupled weight decay: --weight-decay is AdamW's (and Muon's) own,
    # applied after BNP, and never added to the gradient.
    'adamw': lambda learning_rate, config: optax.adamw(
        learning_rate, weight_decay=config.weight_decay),
    'muon': lambda learning_rate, config: _modern.muon(
        learning_rate, config.weight_decay),
    'kfac': lambda learning_rate, config: _modern.kfac(),
}
# Base optimizers that apply --weight-decay themselves.
DECOUPLED_WEIGHT_DECAY = frozenset({'adamw', 'muon'})

# The paper's best learning rates, keyed (model, dataset, batch size).
# Table 2 (fully connected network, SGD) and Table 3 (CNNs; bn4 with Adam).
LEARNING_RATES = {
    ('fc', 'mnist', 60): dict(vanilla=1e-1, bn=5e-1, bnp=5e-1, ln=1e-1),
    ('fc', 'cifar10', 60): dict(vanilla=1e-2, bn=5e-1, bnp=1e-1, ln=5e-1),
    ('fc', 'cifar10', 6): dict(vanilla=5e-3, bn=5e-2, bnp=5e-2, renorm=5e-2,
                               ln=5e-2),
    ('fc', 'cifar10', 1): dict(vanilla=5e-4, bnp=1e-1, ln=1e-2),
    ('cnn5', 'cifar10', 128): dict(vanilla=1e-1, bn=1e-1, bnp=1e-1,
                                   bn4=5e-3),
    ('cnn5', 'cifar10', 2): dict(vanilla=1e-3, bn=1e-3, bnp=1e-2,
                                 renorm=1e-2, bn4=1e-4),
    ('cnn5', 'cifar10', 1): dict(vanilla=1e-3, bnp=1e-1, bn4=1e-3),
    ('resnet110', 'cifar10', 128): dict(bn=1e-1, bnp=1e-1, bnp_gn=1e-1,
                                        gn=1e-1),
    ('preact_resnet110', 'cifar100', 128): dict(bn=1e-1, bnp=1e-2,
                                                bnp_gn=1e-1, gn=1e-1),
    ('resnet18', 'imagenet', 256): dict(bn=1e-1, bnp_gn=1e-1, gn=1e-1),
}
FALLBACK_LEARNING_RATE = 1e-2


def _same_data(dataset: str) -> str:
  """The dataset whose rows of the tables are a run's own.

  ``digits`` (scikit-learn's 8x8 digits, the offline stand-in for MNIST)
  takes MNIST's.
  """
  return 'mnist' if dataset == 'digits' else dataset


def default_learning_rate(model: str, dataset: str, batch_size: int,
                          method: str) -> tuple[float, str]:
  """The paper's learning rate for a run, and where it comes from.

  The paper's tables give a rate for some (model, dataset, batch size,
  method) only. The rule: the same model's entries for the run's own
  dataset (MNIST's for ``digits``) that have the method, the nearest batch
  size (in log scale); for a method without one, the rate of its
  ``rate_from`` method chosen the same way (BN's for Batch Renorm, LN and
  GN). A rate is never borrowed from another dataset silently: only when
  the run's dataset has no entry for the method or its ``rate_from``,
  the nearest entry of another dataset (CIFAR-10 first) is used, and the
  source says ``borrowed from DATASET`` and to pass ``--lr``. Finally
  :data:`FALLBACK_LEARNING_RATE` (so for BN with 4 Things, trained with
  Adam, outside the 5-layer CNN: never BN's SGD rate).

  Args:
    model: model name.
    dataset: dataset name.
    batch_size: the batch size.
    method: method name.

  Returns:
    ``(learning_rate, source)``, the source a short human-readable note
    naming the table entry used.

  Example:
    >>> default_learning_rate('fc', 'mnist', 60, 'bnp')
    (0.5, 'Table 2: fc, mnist, batch size 60')
    >>> default_learning_rate('fc', 'mnist', 1, 'vanilla')
    (0.1, 'Table 2: fc, mnist, batch size 60 (nearest batch size)')
  """
  own = _same_data(dataset)
  others = [d for d in ('cifar10', 'mnist', 'cifar100', 'imagenet')
            if d != own]
  rows = [(k, v) for k, v in LEARNING_RATES.items() if k[0] == model]
  known = _models.MODELS.get(model)
  table = (known and known.paper_table) or 'tables'

  def batch_distance(key):
    return (round(abs(math.log(key[2]) - math.log(max(batch_size, 1))), 6),
            key[2])

  rate_from = METHODS[method].rate_from if method in METHODS else None
  names = (method,) + ((rate_from,) if rate_from else ())
  for datasets in ([own], others):
    for name in names:
      candidates = [(k, v) for k, v in rows if name in v and k[1] in datasets]
      if not candidates:
        continue
      (m, d, bs), lrs = min(
          candidates,
          key=lambda kv: (datasets.index(kv[0][1]),) + batch_distance(kv[0]))
      note = f'{table}: {m}, {d}, batch size {bs}'
      if name != method:
        note += (f', {METHODS[name].label} rate (the paper has none for '
                 f'{method})')
      if d != own:
        note += (f' (borrowed from {d}: the paper has no {own} rate for '
                 f'{method}; pass --lr to choose one)')
      elif bs != batch_size:
        note += ' (nearest batch size)'
      if dataset != own and d == own:
        note += f' ({own} rate, for {dataset})'
      return lrs[name], note
  return FALLBACK_LEARNING_RATE, "default (not in the paper's tables)"
