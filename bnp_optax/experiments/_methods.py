"""Methods compared in the paper and their learning rates (Tables 2 and 3)."""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method: a normalisation layer and whether BNP is used.

  Attributes:
    name: the name used on the command line and in results.
    label: the name used in figures.
    norm: the model's normalisation, see ``_models.NORMS``.
    bnp: precondition the gradients with BNP.
    optimizer: the base optimizer when the run gives none (``RunConfig``'s
      ``optimizer=None``): the paper's, SGD except for BN with 4 Things,
      which it trains with Adam (Section 5.2, Appendix B); AdamW, Muon or
      K-FAC for the comparison's optimisers (``_modern.py``).
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
  arch: str | None = None
  bnp_variant: str = 'full'
  clip: str | None = None


METHODS = {
    m.name: m for m in (
        Method('vanilla', 'Vanilla', 'none', False),
        Method('bn', 'BN', 'bn', False),
        Method('renorm', 'BN Renorm', 'renorm', False),
        Method('ln', 'LN', 'ln', False),
        Method('gn', 'GN', 'gn', False),
        Method('bnp', 'BNP', 'none', True),
        Method('bnp_gn', 'BNP+GN', 'gn', True),
        # Summers and Dinneen (2020), see _bn4.py.
        Method('bn4', 'BN w/ 4 Things', 'bn4', False, optimizer='adam'),
        # Today's methods (docs/comparison.md, _modern.py, _normfree.py).
        Method('adamw', 'AdamW', 'none', False, optimizer='adamw'),
        Method('bnp_adamw', 'BNP+AdamW', 'none', True, optimizer='adamw'),
        Method('centring_adamw', 'BNP centring+AdamW', 'none', True,
               optimizer='adamw', bnp_variant='centring'),
        Method('muon', 'Muon', 'none', False, optimizer='muon'),
        Method('kfac', 'K-FAC', 'none', False, optimizer='kfac'),
        Method('gn_ws', 'GN+WS', 'gn', False, arch='gn_ws'),
        Method('nf_agc', 'NF+AGC', 'none', False, arch='nf', clip='agc'),
    )
}

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

_TABLE = {'fc': 'Table 2', 'cnn5': 'Table 3', 'resnet110': 'Table 3',
          'preact_resnet110': 'Table 3', 'resnet18': 'Table 3'}


def default_learning_rate(model: str, dataset: str, batch_size: int,
                          method: str) -> tuple[float, str]:
  """The paper's learning rate for a run, and where it comes from.

  The paper's tables give a rate for some (model, dataset, batch size,
  method) only. The rule: among the same model's entries that have the
  method, the nearest batch size (in log scale) first, then the same
  dataset, then MNIST (for ``digits``), then CIFAR-10; for Batch Renorm, LN
  and GN without any entry, BN's rate chosen the same way; finally
  :data:`FALLBACK_LEARNING_RATE` (so for BN with 4 Things, trained with
  Adam, outside the 5-layer CNN: never BN's SGD rate).

  Args:
    model: model name.
    dataset: dataset name.
    batch_size: the batch size.
    method: method name.

  Returns:
    ``(learning_rate, source)``, the source a short human-readable note.

  Example:
    >>> default_learning_rate('fc', 'mnist', 60, 'bnp')
    (0.5, 'Table 2: fc, mnist, batch size 60')
  """
  dataset_order = [dataset] + (['mnist'] if dataset == 'digits' else []) + [
      d for d in ('mnist', 'cifar10', 'cifar100', 'imagenet')
      if d != dataset]
  rows = [(k, v) for k, v in LEARNING_RATES.items() if k[0] == model]
  table = _TABLE.get(model, 'tables')

  def distance(key):
    _, d, bs = key
    rank = dataset_order.index(d) if d in dataset_order else len(
        dataset_order)
    return (round(abs(math.log(bs) - math.log(max(batch_size, 1))), 6),
            rank, bs)

  for name in (method,) + (('bn',) if method in ('renorm', 'ln', 'gn')
                           else ()):
    candidates = [(k, v) for k, v in rows if name in v]
    if candidates:
      (m, d, bs), lrs = min(candidates, key=lambda kv: distance(kv[0]))
      note = f'{table}: {m}, {d}, batch size {bs}'
      if name != method:
        note += f', BN rate (the paper has none for {method})'
      elif (d, bs) != (dataset, batch_size):
        note += ' (nearest entry)'
      return lrs[name], note
  return FALLBACK_LEARNING_RATE, "default (not in the paper's tables)"
