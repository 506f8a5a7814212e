"""Command line: ``python -m bnp_optax.experiments {run,suite,plot,list}``."""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from bnp_optax.experiments import _data
from bnp_optax.experiments import _methods
from bnp_optax.experiments import _models
from bnp_optax.experiments import _plot
from bnp_optax.experiments import _suites
from bnp_optax.experiments import _train


class UsageError(Exception):
  """A bad configuration, reported before any training starts."""


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(',') if v.strip()]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f'expected integers, got {text!r}') from e


def _seeds(text: str) -> list[int]:
  """``'0,1,2'`` or ``'3x'`` (three seeds from 0)."""
  if text.endswith('x'):
    return list(range(int(text[:-1])))
  return _int_list(text)


def _str_list(text: str) -> list[str]:
  return [v.strip() for v in text.split(',') if v.strip()]


def _add_training_args(p: argparse.ArgumentParser, *, suite: bool) -> None:
  g = p.add_argument_group('training')
  if not suite:
    g.add_argument('--model', default='fc', choices=_models.MODELS)
    g.add_argument('--dataset', default='digits',
                   help=f'one of {", ".join(_data.DATASETS)} (default '
                   'digits: offline, bundled with scikit-learn)')
    g.add_argument('--methods', type=_str_list, default=None,
                   help='comma-separated, from: ' +
                   ', '.join(_methods.METHODS) + ' (default vanilla,bn,bnp)')
    g.add_argument('--batch-size', type=int, default=60)
  else:
    g.add_argument('--methods', type=_str_list, default=None,
                   help="only these of the suite's methods")
  g.add_argument('--epochs', type=int, default=None if suite else 3)
  g.add_argument('--seeds', type=_seeds, default=[0],
                 help="comma-separated seeds, or e.g. '3x' for 0,1,2")
  g.add_argument('--lr', type=float, default=None,
                 help="learning rate for every method (default: the paper's "
                 'Tables 2 and 3, see `list`)')
  g.add_argument('--optimizer', choices=_train.OPTIMIZERS, default=None)
  g.add_argument('--momentum', type=float, default=None)
  g.add_argument('--weight-decay', type=float, default=None)
  g.add_argument('--warmup-steps', type=int, default=None)
  g.add_argument('--lr-decay-epochs', type=_int_list, default=None)
  g.add_argument('--augment', action=argparse.BooleanOptionalAction,
                 default=None)
  g.add_argument('--train-subset', type=int, default=None,
                 help='train on this many examples (random, same for all runs)')
  g.add_argument('--test-subset', type=int, default=None,
                 help='evaluate on this many test examples')
  g.add_argument('--evals-per-epoch', type=int, default=None)
  g.add_argument('--steps-per-call', type=int, default=None,
                 help='training steps per compiled call (default: about 1024 '
                 'examples per call)')
  g.add_argument('--resnet-blocks', type=int, default=None,
                 help='blocks per stage of the CIFAR ResNets (default 18)')
  g.add_argument('--init-scale', type=float, default=None)
  g.add_argument('--eps1', type=float, default=None)
  g.add_argument('--eps2', type=float, default=None)
  g.add_argument('--rho', type=float, default=None)
  d = p.add_argument_group('data and output')
  d.add_argument('--data-dir', default=None,
                 help='directory holding the dataset (or DIR/<dataset>)')
  d.add_argument('--download', action='store_true',
                 help='download missing data (with MD5 check) into the '
                 'cache directory, or --data-dir when given')
  d.add_argument('--cache-dir', default=None,
                 help='download cache (default $BNP_OPTAX_DATA or '
                 '~/.cache/bnp_optax)')
  d.add_argument('--out', default='results',
                 help='directory for the run JSON files (default results/)')
  ex = d.add_mutually_exclusive_group()
  ex.add_argument('--overwrite', action='store_true',
                  help='replace result files that exist')
  ex.add_argument('--skip-existing', action='store_true',
                  help='keep result files that exist and skip those runs')
  d.add_argument('--no-progress', action='store_true',
                 help='no progress bar (one line per evaluation instead)')
  d.add_argument('--plot', default=None, metavar='PNG',
                 help='also write the figure of these runs to PNG')


_OVERRIDES = ('optimizer', 'momentum', 'weight_decay', 'warmup_steps',
              'lr_decay_epochs', 'augment', 'train_subset', 'test_subset',
              'evals_per_epoch', 'steps_per_call', 'resnet_blocks',
              'init_scale', 'eps1', 'eps2', 'rho')


def _configs(args, *, model, dataset, batch_size, methods, epochs,
             settings=None, method_settings=None):
  configs = []
  for method in methods:
    if method not in _methods.METHODS:
      raise UsageError(f'unknown method {method!r}; expected one of '
                       f'{", ".join(_methods.METHODS)}')
    base = dict(settings or {})
    base.update((method_settings or {}).get(method, {}))
    for field in _OVERRIDES:
      value = getattr(args, field)
      if value is not None:
        base[field] = tuple(value) if field == 'lr_decay_epochs' else value
    for seed in args.seeds:
      config = _train.RunConfig(
          model=model, dataset=dataset, method=method, batch_size=batch_size,
          epochs=epochs, seed=seed, learning_rate=args.lr, **base)
      try:
        _train.validate(config)
      except ValueError as e:
        raise UsageError(str(e)) from e
      configs.append(config)
  if not configs:
    raise UsageError('no runs: empty --methods or --seeds')
  return configs


def _write_json(path: pathlib.Path, result: dict) -> None:
  """Writes atomically (temporary file, then rename)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.' + path.name)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(result, f, indent=1, allow_nan=False)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def execute(configs, args, out_dir: pathlib.Path, *, plot_path=None,
            title=None) -> list[dict]:
  """Checks everything, then trains ``configs`` and writes their JSONs."""
  paths = [out_dir / f'{c.run_name()}.json' for c in configs]
  if len(set(paths)) != len(paths):
    raise UsageError('two runs would write the same file (repeated seed or '
                     'method?)')
  existing = [p for p in paths if p.exists()]
  if existing and not (args.overwrite or args.skip_existing):
    raise UsageError(
        f'{len(existing)} result file(s) exist, e.g. {existing[0]}; pass '
        '--overwrite to replace them or --skip-existing to keep them')
  dataset = configs[0].dataset
  try:
    ds = _data.load(dataset, args.data_dir, download=args.download,
                    cache_dir=args.cache_dir)
  except _data.DataError as e:
    raise UsageError(str(e)) from e
  prepared = {}
  for c in configs:
    key = (c.train_subset, c.test_subset)
    if key not in prepared:
      try:
        prepared[key] = _train.prepare_data(c, ds)
      except (ValueError, _data.DataError) as e:
        raise UsageError(str(e)) from e
  first = prepared[(configs[0].train_subset, configs[0].test_subset)]
  print(f'{dataset}: {len(first.x_train)} train / {len(first.x_test)} test '
        f'from {first.source}; {len(configs)} run(s) -> {out_dir}',
        flush=True)
  results = []
  for config, path in zip(configs, paths):
    if path.exists() and args.skip_existing:
      with open(path) as f:
        results.append(json.load(f))
      print(f'kept {path}')
      continue
    lr, source = config.resolved_learning_rate()
    print(f'-- {config.model} {config.dataset} bs{config.batch_size} '
          f'{config.method} seed {config.seed}: lr {lr:g} ({source})',
          flush=True)
    result = _train.train(
        config, prepared[(config.train_subset, config.test_subset)],
        progress=not args.no_progress)
    t = result['timing']
    print(f'   done in {t["total_s"]:.1f}s (compile {t["compile_s"]:.1f}s, '
          f'per step: data {t["data_us_per_step"]:.0f}us, compiled step '
          f'{t["step_us_per_step"]:.0f}us; eval {t["eval_s"]:.1f}s)',
          flush=True)
    _write_json(path, result)
    results.append(result)
  print()
  print(_plot.summary_table(results))
  if plot_path:
    print(f'figure: {_plot.plot(results, plot_path, title=title)}')
  return results


def _cmd_run(args):
  methods = args.methods or ['vanilla', 'bn', 'bnp']
  if args.dataset not in _data.DATASETS:
    raise UsageError(f'unknown dataset {args.dataset!r}; expected one of '
                     f'{", ".join(_data.DATASETS)}')
  configs = _configs(args, model=args.model, dataset=args.dataset,
                     batch_size=args.batch_size, methods=methods,
                     epochs=args.epochs)
  execute(configs, args, pathlib.Path(args.out), plot_path=args.plot)


def _cmd_suite(args):
  if args.name not in _suites.SUITES:
    raise UsageError(f'unknown suite {args.name!r}; expected one of '
                     f'{", ".join(_suites.SUITES)}')
  suite = _suites.SUITES[args.name]
  methods = args.methods or list(suite.methods)
  unknown = [m for m in methods if m not in suite.methods]
  if unknown:
    raise UsageError(f'suite {suite.name} has no method(s) {unknown}; it '
                     f'compares {", ".join(suite.methods)}')
  configs = _configs(
      args, model=suite.model, dataset=suite.dataset,
      batch_size=suite.batch_size, methods=methods,
      epochs=args.epochs or suite.epochs, settings=suite.settings,
      method_settings=suite.method_settings)
  out = pathlib.Path(args.out) / suite.name
  plot_path = args.plot or out / f'{suite.name}.png'
  execute(configs, args, out, plot_path=plot_path,
          title=f'{suite.name}: {suite.figure}')


def _cmd_plot(args):
  try:
    results = _plot.load_results(args.paths)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  print(_plot.summary_table(results))
  print(f'figure: {_plot.plot(results, args.output, title=args.title)}')


def _cmd_list(args):
  del args
  print('methods:')
  for m in _methods.METHODS.values():
    print(f'  {m.name:<8} {m.label:<10} norm={m.norm:<7} bnp={m.bnp}')
  print('models:   ' + ', '.join(_models.MODELS))
  print('datasets: ' + ', '.join(_data.DATASETS))
  print("suites (python -m bnp_optax.experiments suite NAME):")
  for s in _suites.SUITES.values():
    print(f'  {s.name:<15} {s.figure}: {s.model} {s.dataset} bs '
          f'{s.batch_size}, {",".join(s.methods)}, {s.epochs} epochs')
  print("the paper's learning rates (Tables 2 and 3):")
  for (model, dataset, bs), lrs in _methods.LEARNING_RATES.items():
    rates = ', '.join(f'{k} {v:g}' for k, v in lrs.items())
    print(f'  {model:<17} {dataset:<9} bs {bs:<4} {rates}')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m bnp_optax.experiments',
      description="Reproduce the BNP paper's experiments (Section 5): train, "
      'compare methods over seeds, write JSON results and figures.')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('run', help='train methods x seeds on one setting')
  _add_training_args(p, suite=False)
  p.set_defaults(func=_cmd_run)
  p = sub.add_parser('suite', help="run one of the paper's comparisons")
  p.add_argument('name', help='suite name (see `list`)')
  _add_training_args(p, suite=True)
  p.set_defaults(func=_cmd_suite)
  p = sub.add_parser('plot', help='figure (PNG) from run JSON files')
  p.add_argument('paths', nargs='+', help='JSON files or directories')
  p.add_argument('-o', '--output', required=True, help='PNG to write')
  p.add_argument('--title', default=None)
  p.set_defaults(func=_cmd_plot)
  p = sub.add_parser('list', help='methods, models, suites, learning rates')
  p.set_defaults(func=_cmd_list)
  return parser


def main(argv=None) -> int:
  """Entry point; returns the exit status."""
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  try:
    args.func(args)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted; finished runs are saved', file=sys.stderr)
    return 130
  if args.command in ('run', 'suite'):
    print(f'total {time.perf_counter() - start:.1f}s')
  return 0

