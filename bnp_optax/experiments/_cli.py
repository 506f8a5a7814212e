"""Command line: ``python -m bnp_optax.experiments {run,suite,plot,list}``.

Every check runs before the first training step: the configuration's ranges
(:mod:`_config`), the data, the output location, existing results and the
locks of the runs to write. A user error prints ``error: ...`` and exits
with status 2, having written nothing. SIGINT and SIGTERM stop training at
the next step boundary: finished runs stay saved, the interrupted one leaves
only its last checkpoint (if it takes them), and the exit status is 130 or
143.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys
import time

from bnp_optax.experiments import _config
from bnp_optax.experiments import _data
from bnp_optax.experiments import _deps
from bnp_optax.experiments import _files
from bnp_optax.experiments import _manifest
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _models
from bnp_optax.experiments import _plot
from bnp_optax.experiments import _results
from bnp_optax.experiments import _suites
from bnp_optax.experiments import _sweep
from bnp_optax.experiments import _train


class UsageError(Exception):
  """A bad configuration, reported before any training starts."""


class _Signals:
  """SIGINT/SIGTERM set a flag that training checks between steps.

  A signal that raises KeyboardInterrupt inside XLA's or tqdm's threads, or
  halfway through a compiled call, made the interpreter crash at exit
  (segfaults); with a flag, the compiled call finishes and the process
  exits normally. A second signal restores the default action and kills.
  """

  def __init__(self):
    self.received = 0
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGINT, signal.SIGTERM):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    del frame
    if self.received:
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.received = signum
    print(f'\n{signal.Signals(signum).name}: stopping at the next step '
          'boundary (send it again to kill now)', file=sys.stderr,
          flush=True)

  def __call__(self) -> int:
    return self.received

  def check(self):
    if self.received:
      raise _train.Interrupted(self.received)


@dataclasses.dataclass
class _Planned:
  config: _config.RunConfig
  path: pathlib.Path
  action: str  # 'train', 'keep' or 'replace'
  checkpoint: pathlib.Path | None
  resume: bool = False


def _grids(args, methods):
  """``{method: rates}`` of a sweep (``--lr-grid``), or None."""
  if not getattr(args, 'lr_grid', None):
    if getattr(args, 'sweep_summary', None):
      raise UsageError('--sweep-summary needs --lr-grid')
    return None
  if args.learning_rate is not None:
    raise UsageError('--lr and --lr-grid exclude each other (the grid gives '
                     'the rates)')
  if args.validation_split is not None and not args.validation_split > 0:
    raise UsageError('--lr-grid selects each rate on a held-out split: '
                     '--validation-split must be > 0, got '
                     f'{args.validation_split}')
  try:
    return _sweep.parse_grids(args.lr_grid, methods)
  except _sweep.GridError as e:
    raise UsageError(str(e)) from None


def _configs(args, *, fixed, settings=None, method_settings=None,
             methods=None):
  """One RunConfig per method and seed (and rate, in a sweep); each checked.

  Returns:
    ``(configs, grids)``, ``grids`` the sweep's ``{method: rates}`` or None.
  """
  methods = args.method or methods
  seeds = args.seed if args.seed is not None else [0]
  if not methods or not seeds:
    raise UsageError('no runs: empty --methods or --seeds')
  grids = _grids(args, methods)
  configs = []
  for method in methods:
    base = dict(settings or {})
    base.update((method_settings or {}).get(method, {}))
    rates = [None]
    if grids is not None:
      rates = grids[method]
      if args.validation_split is None and not base.get(
          'validation_split'):
        # A suite's own split stays (the seeds at the chosen rate, run
        # without --lr-grid, use it too: their seed 0 is the sweep's run).
        base['validation_split'] = _sweep.DEFAULT_VALIDATION_SPLIT
    for rate in rates:
      for seed in seeds:
        given = dict(fixed, method=method, seed=seed)
        if rate is not None:
          given['learning_rate'] = rate
        try:
          config = _config.from_args(_config.RunConfig, args, base, **given)
          _config.check(config)
        except (ValueError, TypeError) as e:
          raise UsageError(str(e)) from None
        configs.append(config)
  return configs, grids


def _execute(configs, grids, options, out_dir, *, signals, plot_path,
             title=None, sweep_summary=None):
  """Trains the runs; for a sweep, selects and reports each method's rate."""
  if grids is not None:
    summary_path = pathlib.Path(sweep_summary) if sweep_summary else None
    if summary_path is not None:
      _files.check_output_file(summary_path, '--sweep-summary')
  results = execute(configs, options, out_dir, signals=signals,
                    plot_path=plot_path, title=title)
  if grids is None:
    return results
  try:
    summary = _sweep.summarize(results, grids)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if summary_path is None:
    summary_path = out_dir / f'{_sweep.summary_name(summary)}.json'
  _files.write_json(summary_path, summary, replace=True)
  print()
  print(_sweep.format_table(summary))
  print(f'sweep summary: {summary_path}')
  return results


def _options(args) -> _config.Options:
  options = _config.from_args(_config.Options, args)
  try:
    _config.check(options)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return options


def _wants_checkpoints(config, options) -> bool:
  if options.checkpoint == 'auto':
    return _models.MODELS[config.model].checkpoints
  return options.checkpoint == 'always'


def _plan(configs, options, out_dir: pathlib.Path, plot_path):
  """Checks everything that can be checked without training."""
  names = [c.run_name() for c in configs]
  if len(set(names)) != len(names):
    dup = next(n for n in names if names.count(n) > 1)
    raise UsageError(f'the run {dup} is planned twice (repeated seed or '
                     'method?)')
  if len({c.dataset for c in configs}) != 1:
    raise UsageError('one dataset per command')
  _files.check_writable_dir(out_dir, '--out')
  if plot_path is not None:
    _files.check_output_file(pathlib.Path(plot_path), '--plot')
    _deps.require('matplotlib', 'the figure (--plot, plot)')
  if configs[0].dataset == 'digits':
    _deps.require('sklearn', "the offline 'digits' dataset")
  if options.progress and sys.stdout.isatty():
    _deps.require('tqdm', 'the progress bar (or pass --no-progress)')
  planned = []
  for config, name in zip(configs, names):
    path = out_dir / f'{name}.json'
    ckpt = (out_dir / '.checkpoints' / name
            if _wants_checkpoints(config, options) else None)
    if ckpt is not None:
      _deps.require('orbax.checkpoint', 'checkpointing (or pass '
                  '--checkpoint never)')
    action = 'train'
    if path.exists():
      if not path.is_file():
        raise UsageError(f'{path} exists and is not a file')
      if options.overwrite:
        action = 'replace'
      elif options.skip_existing or options.resume:
        _check_same_config(path, config)
        action = 'keep'
      else:
        done = [c for c in configs
                if (out_dir / f'{c.run_name()}.json').exists()]
        raise UsageError(
            f'{len(done)} of the {len(configs)} planned run(s) finished '
            'before (same configuration): pass --skip-existing to keep them '
            'and train only the rest, or --overwrite to train them again. '
            f'First: {path}')
    resume = False
    if action != 'keep' and options.resume:
      resume = _resumable(config, name, ckpt)
    elif action != 'keep' and ckpt is not None and ckpt.exists():
      if not options.overwrite:
        raise UsageError(
            f'an interrupted run left its checkpoint in {ckpt}; pass '
            '--resume to continue it or --overwrite to start it again')
    planned.append(_Planned(config, path, action, ckpt, resume))
  return planned


def human_time(seconds: float) -> str:
  """A duration in the unit a person reads: us, ms or s, three digits.

  Example:
    >>> human_time(0.894351), human_time(0.000123), human_time(2.5e-6)
    ('894 ms', '123 us', '2.5 us')
  """
  for unit, scale in (('s', 1.0), ('ms', 1e-3), ('us', 1e-6)):
    if seconds >= 0.9995 * scale or unit == 'us':  # 999.9 us is 1 ms.
      value = seconds / scale
      return f'{value:.3g} {unit}' if value < 1000 else f'{value:.0f} {unit}'
  raise AssertionError('unreachable')


def _resumable(config, name, ckpt) -> bool:
  """Whether ``--resume`` continues the run; says so when it cannot.

  The checkpoint is probed here, before any data is loaded or step
  compiled: another configuration's or a damaged one is an error.
  """
  if ckpt is None:
    print(f'--resume: {name} starts from step 0: {config.model} runs are '
          'not checkpointed unless --checkpoint always', flush=True)
    return False
  try:
    step = _manifest.probe(ckpt, _config.canonical(config))
  except _manifest.CheckpointError as e:
    raise UsageError(f'{e}; pass --overwrite to start {name} again, '
                     'without it') from None
  if step is None:
    print(f'--resume: {name} has no checkpoint (in {ckpt.parent}; the '
          'first is saved at its first evaluation): it starts from step 0',
          flush=True)
    return False
  print(f'--resume: {name} continues from its checkpoint at step {step}',
        flush=True)
  return True


def _check_same_config(path, config):
  try:
    stored = _results.read_result(path)
  except (OSError, ValueError) as e:
    raise UsageError(f'{path}: not a readable run result ({e}); pass '
                     '--overwrite to replace it') from None
  if _config.identity_of(stored['config']) != _config.canonical(config):
    raise UsageError(f'{path} holds another configuration than its name '
                     'says; pass --overwrite to replace it')


def _data_key(config):
  """The fields that decide what data a run sees."""
  return (config.train_subset, config.test_subset, config.validation_split)


def _load_data(configs, options):
  try:
    ds = _data.load(configs[0].dataset, options.data_dir,
                    download=options.download, cache_dir=options.cache_dir)
  except _data.DataError as e:
    raise UsageError(str(e)) from None
  prepared = {}
  for c in configs:
    key = _data_key(c)
    if key not in prepared:
      try:
        prepared[key] = _train.prepare_data(c, ds)
      except (ValueError, _data.DataError) as e:
        raise UsageError(str(e)) from None
    try:
      _train.check_data(c, prepared[key])  # Batch vs data, evaluations.
    except (ValueError, _data.DataError) as e:
      raise UsageError(str(e)) from None
  return prepared


def _train_and_write(p, prepared, progress, signals):
  """Trains the planned run ``p`` and writes its JSON; returns the result."""
  config = p.config
  lr, source = config.resolved_learning_rate()
  print(f'-- {config.model} {config.dataset} bs{config.batch_size} '
        f'{config.method} seed {config.seed}: lr {lr:g} ({source})',
        flush=True)
  if p.checkpoint is not None and not p.resume:
    shutil.rmtree(p.checkpoint, ignore_errors=True)
  try:
    result = _train.train(
        config, prepared[_data_key(config)],
        progress=progress, stop=signals, checkpoint_dir=p.checkpoint,
        resume=p.resume)
  except _train.Interrupted as e:
    e.run, e.checkpoint = config.run_name(), p.checkpoint
    raise
  except _manifest.CheckpointError as e:
    raise UsageError(f'{e}; pass --overwrite to start '
                     f'{config.run_name()} again, without it') from None
  t = result['timing']
  print(f'   done in {t["total_s"]:.1f}s (compile {t["compile_s"]:.1f}s, '
        f'per step: data {human_time(t["data_us_per_step"] * 1e-6)}, '
        f'compiled step {human_time(t["step_us_per_step"] * 1e-6)}; '
        f'eval {t["eval_s"]:.1f}s)', flush=True)
  try:
    _files.write_json(p.path, result, replace=p.action == 'replace')
  except _files.ResultExists:
    raise UsageError(
        f'{p.path} was written by another process meanwhile; it was '
        "kept and this run's result discarded") from None
  print(f'   wrote {p.path}', flush=True)
  if p.checkpoint is not None:
    shutil.rmtree(p.checkpoint, ignore_errors=True)
    try:
      p.checkpoint.parent.rmdir()  # Only when no other run has one.
    except OSError:
      pass
  return result


def execute(configs, options: _config.Options, out_dir: pathlib.Path, *,
            signals, plot_path=None, title=None) -> list[dict]:
  """Checks everything, then trains ``configs`` and writes their JSONs."""
  planned = _plan(configs, options, out_dir, plot_path)
  prepared = _load_data(configs, options)
  signals.check()
  first = prepared[_data_key(configs[0])]
  # Whoever makes the directory may remove it again, and only while it is
  # empty: two invocations that both found it missing must not delete each
  # other's runs.
  try:
    out_dir.mkdir(parents=True)
    created = True
  except FileExistsError:
    created = False
  locks = {id(p): _files.Lock(out_dir / f'.{p.path.stem}.lock')
           for p in planned}
  try:
    # Before training: a run another process is writing is an error; the
    # stale locks of dead processes (a killed earlier invocation) go, those
    # of kept runs included.
    for lock in locks.values():
      lock.check()
  except _files.FileError:
    if created:
      try:
        out_dir.rmdir()
      except OSError:
        pass
    raise
  held_out = ('' if first.x_val is None else
              f'{len(first.x_val)} held out for validation / ')
  print(f'{configs[0].dataset}: {len(first.x_train)} train / {held_out}'
        f'{len(first.x_test)} test from {first.source}; {len(configs)} '
        f'run(s) -> {out_dir}', flush=True)
  progress = options.progress and sys.stdout.isatty()
  results = []
  for p in planned:
    signals.check()
    if p.action == 'keep':
      with open(p.path) as f:
        results.append(json.load(f))
      print(f'kept {p.path}')
      continue
    # Each run's lock is held while that run trains and is written only.
    lock = locks[id(p)]
    lock.acquire()
    try:
      results.append(_train_and_write(p, prepared, progress, signals))
    finally:
      lock.release()
  print()
  print(_plot.summary_table(results))
  if plot_path:
    print(f'figure: {_plot.plot(results, plot_path, title=title)}')
  for result in results:
    if result.get('conditioning'):  # Figure 8.
      print()
      print(_plot.conditioning_summary(result))
      if plot_path:
        path = pathlib.Path(plot_path)
        path = path.with_name(f'{path.stem}-conditioning-'
                              f'{result["name"]}.png')
        print(f'figure: {_plot.plot_conditioning(result, path)}')
  return results


def _cmd_run(args, signals):
  options = _options(args)
  configs, grids = _configs(args, fixed={},
                            methods=['vanilla', 'bn', 'bnp'])
  _execute(configs, grids, options, pathlib.Path(options.out),
           signals=signals, plot_path=options.plot,
           sweep_summary=args.sweep_summary)


def _cmd_suite(args, signals):
  if args.name not in _suites.SUITES:
    raise UsageError(f'unknown suite {args.name!r}; expected one of '
                     f'{", ".join(_suites.SUITES)}')
  suite = _suites.SUITES[args.name]
  unknown = [m for m in (args.method or []) if m not in suite.methods]
  if unknown:
    raise UsageError(f'suite {suite.name} has no method(s) {unknown}; it '
                     f'compares {", ".join(suite.methods)}')
  options = _options(args)
  configs, grids = _configs(
      args, fixed=dict(model=suite.model, dataset=suite.dataset,
                       batch_size=suite.batch_size),
      settings=dict(suite.settings, epochs=suite.epochs),
      method_settings=suite.method_settings, methods=list(suite.methods))
  out = pathlib.Path(options.out) / suite.name
  # A sweep's many curves make no useful figure: only with --plot.
  plot_path = options.plot or (
      None if grids is not None else out / f'{suite.name}.png')
  _execute(configs, grids, options, out, signals=signals,
           plot_path=plot_path, title=f'{suite.name}: {suite.figure}',
           sweep_summary=args.sweep_summary)


def _cmd_plot(args, signals):
  del signals
  if args.output is not None:
    _files.check_output_file(pathlib.Path(args.output), '-o/--output')
    _deps.require('matplotlib', 'plot')
  if args.csv is not None:
    _files.check_output_file(pathlib.Path(args.csv), '--csv')

  def skipped(path, why):
    print(f'skipped {path}: {why}', file=sys.stderr)

  try:
    results = _results.load_results(args.paths, on_skip=skipped)
    table = _plot.summary_table(results)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from None
  print(table)
  if args.csv is not None:
    print(f'table: {_plot.write_summary_csv(results, args.csv)}')
  if args.output is not None:
    print(f'figure: {_plot.plot(results, args.output, title=args.title)}')


def _cmd_list(args, signals):
  del args, signals
  print('methods:')
  for m in _methods.METHODS.values():
    print(f'  {m.name:<8} {m.label:<15} norm={m.norm:<7} bnp={m.bnp!s:<5} '
          f'optimizer={m.optimizer}')
  print('models:   ' + ', '.join(_models.MODELS))
  print('datasets: ' + ', '.join(_data.DATASETS))
  print('suites (python -m bnp_optax.experiments suite NAME):')
  for s in _suites.SUITES.values():
    print(f'  {s.name:<15} {s.figure}: {s.model} {s.dataset} bs '
          f'{s.batch_size}, {",".join(s.methods)}, {s.epochs} epochs')
    if s.settings:
      print('      settings: ' + ', '.join(
          f'{k}={v}' for k, v in s.settings.items()))
    for method, settings in s.method_settings.items():
      if method not in s.methods:
        continue
      print(f'      {method}: ' + ', '.join(
          f'{k}={v}' for k, v in settings.items()))
  print("the paper's learning rates (Tables 2 and 3), the defaults of runs "
        'without --lr (digits takes the MNIST rows; the rule: '
        'help(bnp_optax.experiments.default_learning_rate)):')
  for (model, dataset, bs), lrs in _methods.LEARNING_RATES.items():
    if dataset not in _data.DATASETS:  # ResNet-18 on ImageNet.
      continue
    rates = ', '.join(f'{k} {v:g}' for k, v in lrs.items())
    print(f'  {model:<17} {dataset:<9} bs {bs:<4} {rates}')


_IDENTITY_NOTE = (
    'Each run is identified by its full configuration (every training '
    'flag): the result file is named MODEL-DATASET-bsN-METHOD-HASH-seedS.json '
    'with HASH a short hash of the configuration without the seed, and the '
    'JSON holds the configuration. --skip-existing and --overwrite act only '
    'on runs of the identical configuration.')

_PLOT_NOTE = (
    'Runs are grouped by their full configuration except the seed: one '
    'curve per configuration (mean over seeds, the shaded band spanning the '
    'min and max), configurations that differ in anything besides the '
    'method show the differing fields in the legend; two results of one '
    'configuration with the same seed are an error. One panel per model, '
    'dataset and batch size.')


_SWEEP_NOTE = (
    'Learning-rate sweep: with --lr-grid, every method trains at every rate '
    'of its grid (and every seed) on the training set minus a held-out '
    'validation split (--validation-split, default '
    f"{_sweep.DEFAULT_VALIDATION_SPLIT:g} with a grid), and each method's "
    f'rate is selected: {_sweep.SELECTION_RULE}. A table of held-out '
    'accuracy per rate and the selected rates is printed and written to a '
    'JSON summary.')


def _add_sweep_arguments(parser) -> None:
  group = parser.add_argument_group('learning-rate sweep', _SWEEP_NOTE)
  group.add_argument(
      '--lr-grid', action='append', metavar='R1,R2,...', default=None,
      help="rates to sweep, for every method ('0.01,0.1,1'), or for one "
      "('bnp:0.1,1,10'; repeat the flag); excludes --lr")
  group.add_argument(
      '--sweep-summary', metavar='JSON', default=None,
      help="where to write the sweep's summary (default: "
      'OUT/sweep-MODEL-DATASET-bsN-HASH.json)')


def build_parser() -> argparse.ArgumentParser:
  """The parser, its training and output flags derived from _config."""
  parser = argparse.ArgumentParser(
      prog='python -m bnp_optax.experiments',
      description="Reproduce the BNP paper's experiments (Section 5): train, "
      'compare methods over seeds, write JSON results and figures. '
      + _IDENTITY_NOTE)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('run', help='train methods x seeds on one setting',
                     description=_IDENTITY_NOTE)
  _config.add_arguments(p.add_argument_group('training (the run identity)'),
                        _config.RunConfig, defaults=dict(
                            method='vanilla,bn,bnp'))
  _config.add_arguments(p.add_argument_group('data and output'),
                        _config.Options)
  _add_sweep_arguments(p)
  p.set_defaults(func=_cmd_run)
  p = sub.add_parser('suite', help="run one of the paper's comparisons",
                     description="One of the paper's comparisons; its model, "
                     'dataset, batch size and settings are fixed, the other '
                     'flags change them. ' + _IDENTITY_NOTE)
  p.add_argument('name', metavar='NAME',
                 help='suite name: ' + ', '.join(_suites.SUITES))
  _config.add_arguments(
      p.add_argument_group('training (the run identity; defaults: the '
                           "suite's settings (see `list`), else as shown)"),
      _config.RunConfig,
      exclude=('model', 'dataset', 'batch_size'),
      defaults=dict(method="the suite's", epochs="the suite's"))
  _config.add_arguments(p.add_argument_group('data and output'),
                        _config.Options)
  _add_sweep_arguments(p)
  p.set_defaults(func=_cmd_suite)
  p = sub.add_parser('plot', help='summary table (text, CSV) and figure '
                     '(PNG) from run JSON files', description=_PLOT_NOTE)
  p.add_argument('paths', nargs='+', help='JSON files or directories '
                 '(searched recursively; files there that are not run '
                 'results are skipped, and named on stderr)')
  p.add_argument('-o', '--output', default=None,
                 help='PNG to write (default: none, the table only)')
  p.add_argument('--csv', default=None, metavar='CSV',
                 help='also write the summary table as CSV')
  p.add_argument('--title', default=None, help='figure title (default: none)')
  p.set_defaults(func=_cmd_plot)
  p = sub.add_parser('list', help='methods, models, suites, learning rates')
  p.set_defaults(func=_cmd_list)
  return parser


def _interrupted_message(e) -> str:
  """What an interrupt kept, what it lost, and how to keep it next time."""
  text = (f'interrupted ({signal.Signals(e.signum).name}): finished runs '
          'are saved')
  run = getattr(e, 'run', None)
  if run is None:
    return text + '.'
  steps = '' if e.step is None else f' ({e.step} steps)'
  ckpt = getattr(e, 'checkpoint', None)
  if ckpt is None:
    return (f'{text}; the progress of {run}{steps} is lost: it was not '
            'checkpointed. To keep it next time, pass --checkpoint always '
            '(a checkpoint at each evaluation), then --resume after an '
            'interrupt.')
  try:
    step = max((int(d.name) for d in ckpt.iterdir() if d.name.isdigit()),
               default=None)
  except OSError:
    step = None
  if step is None:
    return (f'{text}; {run}{steps} is lost: it was interrupted before its '
            'first checkpoint (saved at each evaluation).')
  return (f'{text}; {run} keeps its checkpoint at step {step} in {ckpt} '
          '(the steps after it are lost): rerun the same command with '
          '--resume to continue it.')


def main(argv=None) -> int:
  """Entry point; returns the exit status."""
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  try:
    with _Signals() as signals:
      args.func(args, signals)
  except (UsageError, _files.FileError, _deps.MissingDependency) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except _train.Interrupted as e:
    print(_interrupted_message(e), file=sys.stderr)
    return 128 + e.signum
  if args.command in ('run', 'suite'):
    print(f'total {time.perf_counter() - start:.1f}s')
  return 0
