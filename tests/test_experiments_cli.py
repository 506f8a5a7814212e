"""Command line of bnp_optax.experiments: runs, JSON schema, plot, errors."""

import gzip
import json

import numpy as np
import pytest

from bnp_optax.experiments import _cli
from bnp_optax.experiments import _results
from bnp_optax.experiments import _train

_TINY = ['--train-subset', '120', '--test-subset', '60', '--no-progress']


def _run(argv, capsys):
  status = _cli.main(argv)
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture(scope='module')
def digits_runs(tmp_path_factory):
  """Two methods x two seeds on the offline digits, one epoch each."""
  out = tmp_path_factory.mktemp('runs')
  status = _cli.main(['run', '--methods', 'vanilla,bnp', '--seeds', '0,1',
                      '--epochs', '1', '--evals-per-epoch', '2',
                      '--batch-size', '10', '--out', str(out)] + _TINY)
  assert status == 0
  return out


def test_run_writes_one_json_per_run(digits_runs):
  files = sorted(digits_runs.glob('*.json'))
  expected = sorted(
      _train.RunConfig(method=m, seed=s, epochs=1, evals_per_epoch=2,
                       batch_size=10, train_subset=120,
                       test_subset=60).run_name() + '.json'
      for m in ('vanilla', 'bnp') for s in (0, 1))
  assert [f.name for f in files] == expected
  assert files[0].name.startswith('fc-digits-bs10-bnp-')
  for f in files:
    result = json.loads(f.read_text())
    _results.check_result(result)
    config = result['config']
    assert config['dataset'] == 'digits' and config['model'] == 'fc'
    assert config['batch_size'] == 10 and config['num_train'] == 120
    assert config['learning_rate_source'].startswith('Table 2')
    assert config['steps_per_epoch'] == 12
    assert set(result['versions']) >= {'jax', 'flax', 'optax', 'bnp_optax'}
    history = result['history']
    assert [p['epoch'] for p in history] == [0.0, 0.5, 1.0]
    assert history[0]['train_loss'] is None
    assert all(np.isfinite(p['train_loss']) for p in history[1:])
    assert all(0 <= p['test_accuracy'] <= 1 for p in history)
    assert history[-1]['step'] == 12
    timing = result['timing']
    assert timing['steps'] == 12 and timing['step_s'] > 0
  seeds = [json.loads(f.read_text())['history'][-1]['test_accuracy']
           for f in files[:2]]
  assert len(set(seeds)) == 2 or seeds[0] > 0  # Seeds are separate runs.


def test_results_are_never_overwritten_silently(digits_runs, capsys):
  before = {f: f.read_text() for f in digits_runs.glob('*.json')}
  argv = ['run', '--methods', 'vanilla', '--epochs', '1', '--batch-size',
          '10', '--evals-per-epoch', '2', '--out', str(digits_runs)] + _TINY
  status, _, err = _run(argv, capsys)
  assert status == 2 and '--overwrite' in err
  assert {f: f.read_text() for f in digits_runs.glob('*.json')} == before
  status, out, _ = _run(argv + ['--skip-existing'], capsys)
  assert status == 0 and 'kept' in out
  assert {f: f.read_text() for f in digits_runs.glob('*.json')} == before


def test_plot_writes_png(digits_runs, tmp_path, capsys):
  png = tmp_path / 'figure.png'
  status, out, _ = _run(['plot', str(digits_runs), '-o', str(png)], capsys)
  assert status == 0 and 'vanilla' in out and 'bnp' in out
  data = png.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  image = matplotlib.image.imread(png)
  assert image.shape[0] > 200 and image.shape[1] > 200
  assert np.std(image[..., :3]) > 0.01  # Not a blank canvas.


def test_plot_rejects_non_results(tmp_path, capsys):
  (tmp_path / 'other.json').write_text('{"a": 1}')
  status, _, err = _run(['plot', str(tmp_path), '-o',
                         str(tmp_path / 'x.png')], capsys)
  assert status == 2 and 'no run results' in err
  assert not (tmp_path / 'x.png').exists()


def test_suite_runs_and_plots(tmp_path, capsys):
  status, out, _ = _run(['suite', 'digits', '--methods', 'bn', '--epochs',
                         '1', '--out', str(tmp_path)] + _TINY, capsys)
  assert status == 0, out
  assert (tmp_path / 'digits' / 'digits.png').stat().st_size > 10_000
  assert len(list((tmp_path / 'digits').glob('*.json'))) == 1
  status, _, err = _run(['suite', 'fig3-mnist', '--methods', 'renorm',
                         '--out', str(tmp_path)], capsys)
  assert status == 2 and 'has no method' in err


@pytest.mark.parametrize('argv,message', [
    (['run', '--methods', 'bnp,batchnorm'], "unknown method 'batchnorm'"),
    (['run', '--batch-size', '5000'], 'larger than the training set'),
    (['run', '--train-subset', '50', '--batch-size', '60'],
     'larger than the training set'),
    (['run', '--dataset', 'mnist', '--data-dir', '/nonexistent/bnp'],
     'does not exist'),
    (['run', '--dataset', 'imagenet'], 'unknown dataset'),
    (['run', '--epochs', '0'], 'epochs must be >= 1'),
    (['run', '--lr', '-1'], '--lr must be a finite number > 0'),
    (['suite', 'fig9'], 'unknown suite'),
])
def test_bad_configurations_stop_before_training(argv, message, tmp_path,
                                                 capsys):
  status, out, err = _run(argv + ['--out', str(tmp_path), '--no-progress'],
                          capsys)
  assert status == 2
  assert message in err
  assert 'train loss' not in out
  assert not list(tmp_path.glob('*.json'))


def test_corrupt_data_stops_before_training(tmp_path, capsys):
  data = tmp_path / 'data' / 'mnist'
  data.mkdir(parents=True)
  for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
               't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
    with gzip.open(data / f'{name}.gz', 'wb') as f:
      f.write(b'\x00\x00\x08\x01\x00\x00\x00\x10' + b'\x00' * 3)
  status, _, err = _run(['run', '--dataset', 'mnist', '--data-dir',
                         str(tmp_path / 'data'), '--out', str(tmp_path)],
                        capsys)
  assert status == 2 and 'IDX header says' in err


def test_list(capsys):
  status, out, _ = _run(['list'], capsys)
  assert status == 0
  assert 'fig5-bs2' in out and 'renorm' in out and 'Table' not in out[:10]


def test_module_entry_point():
  # pylint: disable=g-import-not-at-top
  import subprocess
  import sys
  done = subprocess.run([sys.executable, '-m', 'bnp_optax.experiments', 'run',
                         '--methods', 'nope'], capture_output=True, text=True,
                        check=False, timeout=120)
  assert done.returncode == 2 and "unknown method 'nope'" in done.stderr
