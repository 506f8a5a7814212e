"""Runs one workload of the comparison page: LR sweep, then seeds.

For every method of a ``cmp-*`` suite (or those given with ``--methods``),
one after the other in this process:

1. the learning-rate sweep: every rate of the method's grid (:data:`GRIDS`;
   ``--rates 3`` keeps the middle three of the five) with seed 0, at the
   suite's compute budget, on the training set minus the held-out 10%; the
   rate is chosen on the held-out split (``--lr-grid``'s rule, see
   ``bnp_optax/experiments/_sweep.py``); the summary is written to
   ``OUT/SUITE/sweep-METHOD.json``;
2. ``--seeds`` seeds (0 included, kept from the sweep) at the chosen rate.

The step-cost ratio against SGD is measured once per method in this process
(``_cost.py``), so every run of a method trains the same number of steps.
Runs already in ``OUT`` are kept (``--skip-existing``): the command can be
interrupted and run again. Usage::

  python docs/comparison/run.py cmp-fc-mnist-bs60 --data-dir DATA
  python docs/comparison/run.py cmp-resnet20-bs8 --methods bnp --rates 3 \\
      --seeds 2 --data-dir gpu_data
"""

import argparse
import json
import pathlib
import sys
import tempfile

from bnp_optax import experiments

HERE = pathlib.Path(__file__).resolve().parent
RUNS = HERE / 'runs'

_SGD = (0.003, 0.01, 0.03, 0.1, 0.3)
_ADAM = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_MUON = (0.003, 0.01, 0.03, 0.1, 0.3)
_SGD_SMALL = (3e-4, 1e-3, 3e-3, 0.01, 0.03)
_ADAM_SMALL = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
_MUON_SMALL = (3e-4, 1e-3, 3e-3, 0.01, 0.03)


def _grids(sgd, bnp, adam, muon) -> dict[str, tuple[float, ...]]:
  return dict(vanilla=sgd, bn=sgd, ln=sgd, gn=sgd, gn_ws=sgd, nf_agc=sgd,
              bnp=bnp, bnp_gn=bnp, adamw=adam, bnp_adamw=adam,
              centring_adamw=adam, muon=muon)


# Five rates per method and workload, log-spaced by ~3, placed around the
# rates that trained best in short trials and the paper's tables (SGD with
# momentum 0.9 here: the paper's plain-SGD rate divided by ~10).
GRIDS = {
    'cmp-fc-mnist-bs60': _grids(_SGD, (0.01, 0.03, 0.1, 0.3, 1.0), _ADAM,
                                _MUON),
    'cmp-fc-mnist-bs1': _grids(_SGD_SMALL, (1e-3, 3e-3, 0.01, 0.03, 0.1),
                               _ADAM_SMALL, _MUON_SMALL),
    'cmp-adam-cnn-mnist-bs60': _grids(_SGD, _SGD, _ADAM, _MUON),
    'cmp-cnn-bs128': _grids(_SGD, _SGD, _ADAM, _MUON),
    'cmp-cnn-bs2': _grids((1e-4, 3e-4, 1e-3, 3e-3, 0.01),
                          (3e-4, 1e-3, 3e-3, 0.01, 0.03), _ADAM_SMALL,
                          _MUON_SMALL),
    'cmp-resnet20-bs128': _grids((0.01, 0.03, 0.1, 0.3, 1.0),
                                 (0.01, 0.03, 0.1, 0.3, 1.0), _ADAM, _MUON),
    'cmp-resnet20-bs8': _grids(_SGD, (0.01, 0.03, 0.1, 0.3, 1.0), _ADAM,
                               _MUON),
}


def grid(suite: str, method: str, rates: int) -> tuple[float, ...]:
  """The rates of ``method`` on ``suite``: all five, or the middle three."""
  full = GRIDS[suite][method]
  if rates == len(full):
    return full
  if rates == 3:
    return full[1:4]
  raise ValueError(f'--rates: 5 or 3, got {rates}')


def _fmt(rates) -> str:
  return ','.join(f'{r:g}' for r in rates)


def run_method(suite: str, method: str, *, rates: int, seeds: int, out: str,
               extra: list[str]) -> float | None:
  """Sweep then seeds for one method; returns the chosen rate (or None)."""
  summary = pathlib.Path(out) / suite / f'sweep-{method}.json'
  plot = str(pathlib.Path(tempfile.gettempdir()) / f'{suite}-{method}.png')
  common = ['suite', suite, '--methods', method, '--out', out,
            '--skip-existing', '--no-progress', '--plot', plot] + extra
  rates_text = _fmt(grid(suite, method, rates))
  status = experiments.main(common + [
      '--seeds', '0', '--lr-grid', f'{method}:{rates_text}',
      '--sweep-summary', str(summary)])
  if status:
    raise SystemExit(f'{suite} {method}: the sweep failed ({status})')
  best = json.loads(summary.read_text())['methods'][method][
      'best_learning_rate']
  if best is None:
    print(f'{suite} {method}: every rate diverged; no seeds run')
    return None
  if seeds > 1:
    status = experiments.main(common + ['--seeds', f'{seeds}x', '--lr',
                                         repr(best)])
    if status:
      raise SystemExit(f'{suite} {method}: the seeds failed ({status})')
  return best


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('suite', choices=sorted(GRIDS))
  parser.add_argument('--methods', default=None,
                      help="comma-separated; default: the suite's")
  parser.add_argument('--rates', type=int, default=5, help='5 or 3')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--out', default=str(RUNS))
  args, extra = parser.parse_known_args(argv)
  methods = (args.methods.split(',') if args.methods
             else list(experiments.SUITES[args.suite].methods))
  chosen = {}
  for method in methods:
    chosen[method] = run_method(args.suite, method, rates=args.rates,
                                seeds=args.seeds, out=args.out, extra=extra)
  print(json.dumps(chosen))
  return 0


if __name__ == '__main__':
  sys.exit(main())
