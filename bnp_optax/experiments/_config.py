"""The one definition of a run's configuration, and the CLI derived from it.

:class:`RunConfig` lists every field that can change a run's numbers: its
canonical form (:func:`canonical`) is the run's identity, hashed into the
result file's name and stored in the JSON. :class:`Options` lists how the
runs are executed (where the data and results are, progress output,
checkpoints), which never changes a result. Each field carries its help text
and its range check; :func:`add_arguments` builds the argparse flags from
them and :func:`check` validates a configuration before any training.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any

from bnp_optax._src import transform as _core
from bnp_optax.experiments import _bn4
from bnp_optax.experiments import _data
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _models
from bnp_optax.experiments import _modern
from bnp_optax.experiments import _normfree
from bnp_optax.experiments import _qscale

# Bumped when a field is added or its meaning changes: results of another
# identity version are not comparable and are never mixed.
IDENTITY_VERSION = 2


def _field(default, help_text: str, *, check=None, choices=None, flag=None,
           metavar=None, omit_at_default=False):
  """A dataclass field with its CLI help, range check and flag name.

  ``omit_at_default`` is for fields added after results were published: the
  field enters a run's identity only when it differs from its default, so
  the identity (and file name) of every earlier run stays what it was.
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help_text, check=check, choices=choices, flag=flag,
      metavar=metavar, omit_at_default=omit_at_default))


def _at_least(low):
  def check(v):
    return None if v is None or v >= low else f'must be >= {low}'
  return check


def _positive(v):
  if v is None or (math.isfinite(v) and v > 0):
    return None
  return 'must be a finite number > 0'


def _non_negative(v):
  if v is None or (math.isfinite(v) and v >= 0):
    return None
  return 'must be a finite number >= 0'


def _at_most_one(v):
  return None if v is None or 0 <= v <= 1 else 'must be in [0, 1]'


def _unit_interval(v):
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def _epoch_list(v):
  if not all(e >= 1 for e in v):
    return 'must be epochs >= 1'
  if any(a >= b for a, b in zip(v, v[1:])):
    return 'must be increasing epochs'
  return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run: its identity (stored in its JSON).

  Each field's help text is in its metadata (``--help`` shows it).
  """

  model: str = _field('fc', 'network', choices=tuple(_models.MODELS))
  dataset: str = _field('digits', 'dataset (digits: offline, bundled with '
                        'scikit-learn)', choices=_data.DATASETS)
  method: str = _field('bnp', 'methods to compare, comma-separated',
                       choices=tuple(_methods.METHODS), flag='--methods',
                       metavar='M1,M2')
  batch_size: int = _field(60, 'examples per step', check=_at_least(1))
  epochs: int = _field(3, 'passes over the training set', check=_at_least(1))
  seed: int = _field(0, "seeds (initialisation and data order), "
                     "comma-separated, or e.g. '3x' for 0,1,2",
                     check=_at_least(0), flag='--seeds', metavar='SEEDS')
  learning_rate: float | None = _field(
      None, "learning rate of every method; none: the paper's (Tables 2 "
      'and 3, see `list`)', check=_positive, flag='--lr')
  optimizer: str | None = _field(
      None, "base optimizer after BNP; none: the method's (adam for bn4, "
      'adamw for adamw and bnp_adamw, sgd for the others, as the paper)',
      choices=tuple(_methods.OPTIMIZERS))
  momentum: float = _field(0.9, 'momentum of the momentum optimizer',
                           check=_unit_interval)
  weight_decay: float = _field(0.0, 'L2 weight decay added to the gradient '
                               '(before BNP); with adamw, its decoupled '
                               'weight decay instead', check=_non_negative)
  warmup_steps: int = _field(0, 'linear learning-rate warm-up steps',
                             check=_at_least(0))
  warmup_init: float = _field(0.01, 'learning rate at step 0 of the warm-up',
                              check=_non_negative)
  lr_decay_epochs: tuple[int, ...] = _field(
      (), 'epochs at which the learning rate is divided by 10, '
      'comma-separated', check=_epoch_list, metavar='E1,E2')
  augment: bool = _field(False, 'random crops (4-pixel zero padding) and '
                         'horizontal flips')
  train_subset: int | None = _field(
      None, 'train on this many examples (random, the same for every run); '
      'none: all', check=_at_least(1))
  test_subset: int | None = _field(
      None, 'evaluate on this many test examples; none: all',
      check=_at_least(1))
  evals_per_epoch: int = _field(1, 'test evaluations (history points) per '
                                'epoch, at most the steps per epoch',
                                check=_at_least(1))
  steps_per_call: int | None = _field(
      None, 'training steps per compiled call; none: about 1024 examples, '
      'or 1 for a model with convolutions on CPU (a scan slows them ~9x)',
      check=_at_least(1))
  resnet_blocks: int | None = _field(
      None, 'blocks per stage of the CIFAR ResNets; none: 18 (ResNet-110)',
      check=_at_least(1))
  init_scale: float = _field(1.0, "factor on the ResNets' He-normal "
                             'initialisation', check=_positive)
  eps1: float = _field(_core.DEFAULT_EPS1, "BNP's eps1 (relative variance "
                       'floor)', check=_non_negative)
  eps2: float = _field(_core.DEFAULT_EPS2, "BNP's eps2 (absolute variance "
                       'floor)', check=_non_negative)
  rho: float = _field(_core.DEFAULT_RHO, "BNP's running-average rate",
                      check=_unit_interval)
  conditioning_every: int = _field(
      0, "Figure 8: condition numbers of the output neuron's Hessian every "
      'k steps (BNP methods, fc models); 0: off', check=_at_least(0))
  # BN with 4 Things (method bn4, see _bn4.py). Added after results were
  # published: in an identity only when set, and resolved to bn4's defaults
  # for bn4 runs only (canonical), so every bn4 JSON records them.
  ghost_batch_size: int | None = _field(
      None, 'bn4: Ghost BN ghost batch size; none: '
      f'{_bn4.DEFAULT_GHOST_BATCH_SIZE}', check=_at_least(1),
      omit_at_default=True)
  group_norm_below: int | None = _field(
      None, 'bn4: Batch + Group Norm (groups of '
      f'{_bn4.DEFAULT_GROUP_SIZE} channels) when the batch size is below '
      f'this, else Ghost BN; none: {_bn4.DEFAULT_GROUP_NORM_BELOW}',
      check=_at_least(1), omit_at_default=True)
  example_weight: float | None = _field(
      None, "bn4: weight alpha of an example's own statistics at inference; "
      f'none: {_bn4.DEFAULT_EXAMPLE_WEIGHT}', check=_at_most_one,
      omit_at_default=True)
  norm_weight_decay: float | None = _field(
      None, "bn4: L2 weight decay on the bn4 layers' scale and offset only; "
      f'none: {_bn4.DEFAULT_NORM_WEIGHT_DECAY}', check=_non_negative,
      omit_at_default=True)

  def resolved_optimizer(self) -> str:
    """The base optimizer: the given one, else the method's."""
    if self.optimizer is not None:
      return self.optimizer
    return _methods.METHODS[self.method].optimizer

  def resolved_bn4(self) -> dict[str, Any]:
    """The bn4 fields, their defaults filled in; empty for other methods."""
    if _methods.METHODS[self.method].norm != 'bn4':
      return {}
    defaults = dict(ghost_batch_size=_bn4.DEFAULT_GHOST_BATCH_SIZE,
                    group_norm_below=_bn4.DEFAULT_GROUP_NORM_BELOW,
                    example_weight=_bn4.DEFAULT_EXAMPLE_WEIGHT,
                    norm_weight_decay=_bn4.DEFAULT_NORM_WEIGHT_DECAY)
    return {k: v if getattr(self, k) is None else getattr(self, k)
            for k, v in defaults.items()}

  def bn4_settings(self) -> _bn4.BN4Settings | None:
    """The bn4 layers of this run (decided by its batch size), or None."""
    bn4 = self.resolved_bn4()
    if not bn4:
      return None
    return _bn4.BN4Settings.for_batch_size(
        self.batch_size, ghost_batch_size=bn4['ghost_batch_size'],
        group_norm_below=bn4['group_norm_below'],
        example_weight=bn4['example_weight'])

  # Fields added after results were published: in a run's identity only
  # when set, so that earlier runs keep their names.
  validation_split: float = _field(
      0.0, 'hold out this fraction of the training set (a fixed random '
      'draw, before --train-subset) and train without it; each evaluation '
      "stores its accuracy as validation_accuracy, the test set's as "
      'test_accuracy; 0: no held-out split', check=_unit_interval,
      omit_at_default=True)
  bnp_q: str = _field(
      'paper', "BNP's 1/q^2 scaling (experiment-only variants): paper; "
      'no_conv: conv layers without it (rate eta*q^2 there); none: no '
      'layer', choices=_qscale.Q_SCALINGS, omit_at_default=True)
  bnp_debias: bool = _field(
      False, "debias BNP's running statistics (scale_by_bnp(debias=True)): "
      'remove the pull of their initial mean 0 and variance 1',
      omit_at_default=True)
  budget: int | None = _field(
      None, 'compute budget in SGD steps: before training, the step of this '
      "run is timed against plain SGD's on the vanilla network (same model "
      'and batch, interleaved in this process); a step costing r times '
      "SGD's trains floor(BUDGET / r) steps, whatever --epochs says; none: "
      '--epochs', check=_at_least(1), omit_at_default=True)
  budget_evals: int = _field(
      10, 'with --budget: evaluations, equally spaced in the budget',
      check=_at_least(1), omit_at_default=True)

  def resolved_learning_rate(self) -> tuple[float, str]:
    """The learning rate and where it comes from."""
    if self.learning_rate is not None:
      return float(self.learning_rate), "given (--lr, or the suite's rate)"
    return _methods.default_learning_rate(self.model, self.dataset,
                                          self.batch_size, self.method)

  def group_hash(self) -> str:
    """Short hash of the configuration without the seed (seeds share it)."""
    identity = canonical(self)
    del identity['seed']
    text = json.dumps(identity, sort_keys=True, separators=(',', ':'))
    return hashlib.sha256(text.encode()).hexdigest()[:10]

  def run_name(self) -> str:
    """File stem of the run's JSON: readable fields, config hash, seed."""
    return (f'{self.model}-{self.dataset}-bs{self.batch_size}-{self.method}'
            f'-{self.group_hash()}-seed{self.seed}')


def canonical(config: RunConfig) -> dict[str, Any]:
  """The run's identity: every field, learning rate and optimizer resolved.

  For bn4 runs the bn4 fields are resolved too (their defaults written
  out); for other methods they are None and left out.
  """
  d = dataclasses.asdict(config)
  d['learning_rate'] = config.resolved_learning_rate()[0]
  d['optimizer'] = config.resolved_optimizer()
  d.update(config.resolved_bn4())
  d['lr_decay_epochs'] = list(config.lr_decay_epochs)
  d['identity_version'] = IDENTITY_VERSION
  return _omit_defaults(d)


def method_defaults(method: str) -> dict[str, Any]:
  """The identity fields whose default depends on the method, resolved.

  Example:
    >>> method_defaults('bn')['optimizer'], method_defaults('bn4')['optimizer']
    ('sgd', 'adam')
  """
  resolved = RunConfig(method=method)
  defaults = dict.fromkeys(_BN4_FIELDS)
  defaults.update(resolved.resolved_bn4())
  defaults['optimizer'] = resolved.resolved_optimizer()
  return defaults


IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig)) + (
    'identity_version',)
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_BN4_FIELDS = ('ghost_batch_size', 'group_norm_below', 'example_weight',
               'norm_weight_decay')
# Fields that are in an identity only where they differ from the default.
_OMITTED_AT_DEFAULT = {
    f.name: f.default for f in dataclasses.fields(RunConfig)
    if f.metadata.get('omit_at_default')}


def _omit_defaults(identity: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in identity.items()
          if not (k in _OMITTED_AT_DEFAULT and v == _OMITTED_AT_DEFAULT[k])}


def identity_of(result_config: dict, *, complete: bool = False
                ) -> dict[str, Any]:
  """The identity fields of a result JSON's ``config``.

  Args:
    result_config: the ``config`` of a result JSON.
    complete: every identity field, those omitted at their default
      included (for comparing and describing runs field by field); else
      the identity as :func:`canonical` writes it.
  """
  full = {k: result_config.get(k, _OMITTED_AT_DEFAULT.get(k))
          for k in IDENTITY_FIELDS}
  return full if complete else _omit_defaults(full)


@dataclasses.dataclass(frozen=True)
class Options:
  """How runs are executed: never part of a run's identity."""

  out: str = _field('results', 'directory for the run JSON files (a suite '
                    'writes to OUT/<suite>)', metavar='DIR')
  data_dir: str | None = _field(None, 'directory holding the dataset (or '
                                'DIR/<dataset>)', metavar='DIR')
  download: bool = _field(False, 'download missing data (MD5-checked) into '
                          'the cache directory, or --data-dir when given')
  cache_dir: str | None = _field(None, 'download cache; none: '
                                 '$BNP_OPTAX_DATA or ~/.cache/bnp_optax',
                                 metavar='DIR')
  overwrite: bool = _field(False, 'replace the result of a run with the '
                           'identical configuration')
  skip_existing: bool = _field(False, 'keep the result of a run with the '
                               'identical configuration and skip it')
  resume: bool = _field(False, 'continue interrupted runs from their last '
                        'checkpoint (OUT/.checkpoints)')
  checkpoint: str = _field(
      'auto', 'save an orbax checkpoint at each evaluation: auto: for the '
      'CNN and ResNets', choices=('auto', 'always', 'never'),
      metavar='WHEN')
  progress: bool = _field(True, 'a progress bar when stdout is a terminal '
                          '(otherwise one line per evaluation)')
  plot: str | None = _field(None, 'also write the figure of these runs to '
                            'this PNG', metavar='PNG')


def _base_type(annotation):
  """``(type, optional)`` of a field annotation such as ``int | None``."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(
      annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0], True
  return annotation, False


def _parser_for(kind, optional: bool, name: str):
  """The argparse ``type`` of a field."""
  if typing.get_origin(kind) is tuple:
    def parse_tuple(text):
      try:
        return tuple(int(v) for v in text.split(',') if v.strip())
      except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected comma-separated integers, got {text!r}') from None
    return parse_tuple

  def parse(text):
    if optional and text.lower() == 'none':
      return None
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'{name}: expected {kind.__name__}, got {text!r}') from None
  return parse


def _plural(parse):
  def parse_list(text):
    return [parse(v.strip()) for v in text.split(',') if v.strip()]
  return parse_list


def seeds(text: str) -> list[int]:
  """``'0,1,2'`` or ``'3x'`` (three seeds from 0)."""
  try:
    if text.endswith('x'):
      return list(range(int(text[:-1])))
    return [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"--seeds: expected integers or e.g. '3x', got {text!r}") from None


def flag_of(f: dataclasses.Field) -> str:
  return f.metadata.get('flag') or '--' + f.name.replace('_', '-')


def add_arguments(group, cls, *, exclude=(), defaults=None) -> None:
  """Adds one flag per field of dataclass ``cls`` to ``group``.

  Every flag's default is ``None`` (not given), so that a suite's settings
  apply where the user gave nothing; the help shows the effective default.

  Args:
    group: an argparse parser or argument group.
    cls: :class:`RunConfig` or :class:`Options`.
    exclude: field names without a flag.
    defaults: ``{field: value}`` shown as the default instead of the
      dataclass's (a suite's settings).
  """
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.name in exclude:
      continue
    kind, optional = _base_type(hints[f.name])
    meta = f.metadata
    default = (defaults or {}).get(f.name, f.default)
    if isinstance(default, tuple):
      shown = ','.join(map(str, default)) or 'none'
    else:
      shown = 'none' if default is None else default
    help_text = f'{meta["help"]} (default: {shown})'
    if meta.get('choices'):
      help_text = (f'{meta["help"]}; one of {", ".join(meta["choices"])} '
                   f'(default: {shown})')
    flag = flag_of(f)
    kwargs = dict(dest=f.name, default=None, help=help_text)
    if kind is bool:
      group.add_argument(flag, action=argparse.BooleanOptionalAction,
                         **kwargs)
      continue
    parse = _parser_for(kind, optional, flag)
    if f.name == 'seed':
      parse = seeds
    elif f.name == 'method':
      parse = _plural(str)
    metavar = meta.get('metavar') or (
        'N' if kind is int else 'X' if kind is float else 'NAME')
    group.add_argument(flag, type=parse, metavar=metavar, **kwargs)


def from_args(cls, args, base: dict | None = None, **fixed):
  """An instance of ``cls``: its defaults, then ``base``, then given flags."""
  values = dict(base or {})
  for f in dataclasses.fields(cls):
    given = getattr(args, f.name, None)
    if given is not None:
      values[f.name] = given
  values.update(fixed)
  return cls(**values)


def check(config) -> None:
  """Raises ValueError naming the flag of the first out-of-range field."""
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    meta = f.metadata
    if (meta.get('choices') and value not in meta['choices']
        and not (value is None and f.default is None)):
      raise ValueError(f'{flag_of(f)}: unknown {f.name} {value!r}; expected '
                       f'one of {", ".join(meta["choices"])}')
    checker = meta.get('check')
    message = checker(value) if checker else None
    if message:
      shown = ','.join(map(str, value)) if isinstance(value, tuple) else value
      raise ValueError(f'{flag_of(f)} {message}, got {shown}')
  if isinstance(config, RunConfig):
    lr, _ = config.resolved_learning_rate()
    if not (math.isfinite(lr) and lr > 0):
      raise ValueError(f'--lr must be a finite number > 0, got {lr}')
    bn4_set = [f.name for f in dataclasses.fields(config)
               if f.name in _BN4_FIELDS and getattr(config, f.name) is not None]
    if bn4_set and _methods.METHODS[config.method].norm != 'bn4':
      raise ValueError(f'{flag_of(_FIELDS[bn4_set[0]])} is for bn4 only, '
                       f'not {config.method}')
    if config.bnp_q != 'paper' and not _methods.METHODS[config.method].bnp:
      raise ValueError(f'--bnp-q {config.bnp_q} needs a BNP method, got '
                       f'{config.method}')
    if config.bnp_debias and not _methods.METHODS[config.method].bnp:
      raise ValueError(f'--bnp-debias needs a BNP method, got '
                       f'{config.method}')
    method = _methods.METHODS[config.method]
    if config.resolved_optimizer() == 'kfac':
      why = _modern.kfac_available()
      if why:
        raise ValueError(f'K-FAC ({config.method}): {why}')
    if config.resolved_optimizer() == 'muon' and _modern.muon_available():
      raise ValueError(f'Muon ({config.method}): {_modern.muon_available()}')
    if method.bnp_variant == 'centring' and (
        config.bnp_q != 'paper' or config.bnp_debias):
      raise ValueError(f'{config.method} has no 1/q^2 or variance to change: '
                       '--bnp-q and --bnp-debias are for the full BNP')
    if method.arch and config.model not in _normfree.MODELS:
      raise ValueError(f'--methods {config.method} ({method.arch}) is built '
                       f'for {", ".join(_normfree.MODELS)}, not '
                       f'{config.model}')
    if config.budget_evals != 10 and config.budget is None:
      raise ValueError('--budget-evals needs --budget')
    if config.conditioning_every and not (
        _methods.METHODS[config.method].bnp
        and _models.MODELS[config.model].conditioning):
      raise ValueError('--conditioning-every needs a BNP method and an fc '
                       f'model, got {config.method} on {config.model}')
  if isinstance(config, Options) and config.overwrite and config.skip_existing:
    raise ValueError('--overwrite and --skip-existing exclude each other')
