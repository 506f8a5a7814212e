"""Results of bnp_optax.experiments that can be trusted (issue 11).

Run identity, no mixing in plots, exclusive atomic writes, every check
before training, signals, resume, downloads, progress output, missing
optional dependencies. The CLI tests run the real command in a subprocess
on the offline digits (a few examples) or on small fixtures.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from bnp_optax.experiments import _config
from bnp_optax.experiments import _data
from bnp_optax.experiments import _files
from bnp_optax.experiments import _results as run_results
from bnp_optax.experiments import _train
from tests import test_experiments_data as fixtures

_TINY = ['--methods', 'bnp', '--epochs', '1', '--batch-size', '20',
         '--train-subset', '60', '--test-subset', '30']
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli_run(*args, timeout=180, umask=None, **kwargs):
  """``python -m bnp_optax.experiments ARGS`` in a subprocess."""
  # The child inherits the umask (no preexec_fn: forking a process that
  # runs JAX's threads warns).
  previous = os.umask(umask) if umask is not None else None
  try:
    return subprocess.run(
        [sys.executable, '-m', 'bnp_optax.experiments', *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
        cwd=_ROOT, **kwargs)
  finally:
    if previous is not None:
      os.umask(previous)


def _results(directory):
  return sorted(pathlib.Path(directory).glob('*.json'))


def _no_traceback(done):
  assert 'Traceback' not in done.stderr, done.stderr
  assert 'Segmentation' not in done.stderr, done.stderr


# ------------------------------------------------------------- run identity


def test_identity_is_the_full_configuration(tmp_path):
  out = tmp_path / 'runs'
  done = _cli_run('run', *_TINY, '--out', out, umask=0o027)
  assert done.returncode == 0, done.stderr
  (first,) = _results(out)
  # Mode from the umask (0666 & ~027), not mkstemp's 0600.
  assert stat.S_IMODE(first.stat().st_mode) == 0o640
  stored = json.loads(first.read_text())
  assert stored['config']['rho'] == 0.99 and stored['config']['eps1'] == 0.01
  assert stored['group'] in first.name
  # Another rho is another run: --skip-existing does not keep the first.
  done = _cli_run('run', *_TINY, '--rho', '0.9', '--skip-existing',
                  '--out', out)
  assert done.returncode == 0 and 'kept' not in done.stdout, done.stderr
  files = _results(out)
  assert len(files) == 2
  other = next(f for f in files if f != first)
  assert json.loads(other.read_text())['config']['rho'] == 0.9
  before = other.read_bytes()
  # --overwrite replaces only the identical configuration.
  done = _cli_run('run', *_TINY, '--overwrite', '--out', out)
  assert done.returncode == 0, done.stderr
  assert other.read_bytes() == before
  assert json.loads(first.read_text())['created'] != stored['created']
  assert len(_results(out)) == 2
  assert not [p for p in out.iterdir() if p.name.startswith('.')]


def test_every_field_is_in_the_identity():
  base = _config.RunConfig()
  for field, value in [('rho', 0.9), ('eps1', 0.02), ('eps2', 1e-3),
                       ('momentum', 0.5), ('weight_decay', 1e-4),
                       ('augment', True), ('resnet_blocks', 3),
                       ('test_subset', 100), ('epochs', 4),
                       ('learning_rate', 0.3), ('steps_per_call', 2)]:
    changed = _config.RunConfig(**{field: value})
    assert changed.run_name() != base.run_name(), field
  # The paper's rate given explicitly is the same run as the default.
  lr, _ = base.resolved_learning_rate()
  assert _config.RunConfig(learning_rate=lr).run_name() == base.run_name()
  assert set(_config.canonical(base)) == set(_config.IDENTITY_FIELDS) - set(
      _config._OMITTED_AT_DEFAULT)


def test_published_run_identities_are_stable():
  # Results committed under docs/reproduction/ are named by these hashes: a
  # field added later must be declared omit_at_default, or --skip-existing
  # and the published figures would silently stop matching today's runs.
  assert _config.RunConfig().group_hash() == '2c8ca55cb9'
  assert _config.RunConfig(model='cnn5', dataset='cifar10', batch_size=128,
                           method='bn').group_hash() == 'b0f84a12ea'


# ------------------------------------------------------ no silent mixing


def _fake_runs(directory, template, variants):
  """Result files of configurations ``template | variant``, without training.

  Each variant's runs get a history of two evaluations and an accuracy that
  grows with the variant's index.
  """
  directory.mkdir(parents=True, exist_ok=True)
  for i, changes in enumerate(variants):
    config = _config.RunConfig(**(template | changes))
    acc = 0.3 + 0.1 * i
    history = [dict(epoch=0.0, step=0, train_loss=None, test_accuracy=0.1,
                    test_loss=2.3, time_s=0.0),
               dict(epoch=float(config.epochs), step=10, train_loss=1.0 - acc,
                    test_accuracy=acc, test_loss=1.5, time_s=1.0)]
    result = dict(
        schema=run_results.SCHEMA, name=config.run_name(),
        group=config.group_hash(), created='2026-01-01T00:00:00',
        config=_config.canonical(config) | dict(
            learning_rate_source='test', method_label=config.method.upper()),
        versions={}, history=history,
        final=dict(train_loss=1.0 - acc, test_accuracy=acc, diverged=False),
        timing=dict(total_s=1.0))
    run_results.check_result(result)
    (directory / f'{config.run_name()}.json').write_text(json.dumps(result))


@pytest.fixture
def one_result():
  return dict(method='bnp', batch_size=20, epochs=1, train_subset=60)


def test_plot_separates_learning_rates_and_epochs(one_result, tmp_path):
  runs = tmp_path / 'runs'
  _fake_runs(runs, one_result, [
      dict(learning_rate=0.01, seed=0), dict(learning_rate=0.01, seed=1),
      dict(learning_rate=0.5, seed=0), dict(learning_rate=0.5, seed=1)])
  png = tmp_path / 'lr.png'
  done = _cli_run('plot', runs, '-o', png)
  assert done.returncode == 0, done.stderr
  rows = [r for r in done.stdout.splitlines() if r.startswith('fc ')]
  assert len(rows) == 2, done.stdout  # One row per learning rate.
  assert {r.split()[4] for r in rows} == {'0.01', '0.5'}
  assert all(' 2 ' in r for r in rows)  # Two seeds each, never four.
  assert png.stat().st_size > 10_000
  # A 1-epoch run and 3-epoch runs are separate configurations.
  epochs = tmp_path / 'epochs'
  _fake_runs(epochs, one_result, [dict(epochs=1), dict(epochs=3, seed=0),
                                  dict(epochs=3, seed=1),
                                  dict(epochs=3, seed=2)])
  done = _cli_run('plot', epochs, '-o', tmp_path / 'e.png')
  assert done.returncode == 0, done.stderr
  assert 'epochs=1' in done.stdout and 'epochs=3' in done.stdout


def test_plot_refuses_duplicate_seeds(one_result, tmp_path):
  _fake_runs(tmp_path / 'a', one_result, [dict(seed=0)])
  _fake_runs(tmp_path / 'b', one_result, [dict(seed=0)])
  done = _cli_run('plot', tmp_path / 'a', tmp_path / 'b', '-o',
                  tmp_path / 'x.png')
  assert done.returncode == 2 and 'same seed' not in done.stdout
  assert 'seed 0' in done.stderr and 'error:' in done.stderr
  _no_traceback(done)
  assert not (tmp_path / 'x.png').exists()


@pytest.mark.slow
def test_plot_of_real_runs(tmp_path):
  out = tmp_path / 'runs'
  done = _cli_run('run', *_TINY, '--seeds', '0,1', '--lr', '0.05',
                  '--out', out, '--plot', tmp_path / 'a.png')
  assert done.returncode == 0, done.stderr
  done = _cli_run('run', *_TINY, '--seeds', '0,1', '--lr', '0.5',
                  '--out', out)
  assert done.returncode == 0, done.stderr
  done = _cli_run('plot', out, '-o', tmp_path / 'b.png')
  assert done.returncode == 0, done.stderr
  rows = [r for r in done.stdout.splitlines() if r.startswith('fc ')]
  assert [r.split()[4:6] for r in rows] == [['0.05', '2'], ['0.5', '2']]


def test_plot_shows_one_epoch_runs(one_result, tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from bnp_optax.experiments import _plot  # pylint: disable=g-import-not-at-top
  captured = {}
  original = plt.close

  def keep(fig):
    captured['fig'] = fig
    original(fig)

  _fake_runs(tmp_path / 'r', one_result | dict(evals_per_epoch=1),
             [dict(seed=0), dict(seed=1)])
  results = run_results.load_results([tmp_path / 'r'])
  try:
    plt.close = keep
    _plot.plot(results, tmp_path / 'f.png')
  finally:
    plt.close = original
  ax, loss_ax = captured['fig'].axes[:2]
  # The single training-loss point (one evaluation) is drawn as a marker.
  (loss_line,) = loss_ax.get_lines()
  assert loss_line.get_marker() == 's' and len(loss_line.get_xdata()) == 1
  assert ax.get_lines()[0].get_marker() == 'o'
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert any('min to max over seeds' in t for t in labels)
  assert ax.get_xlim()[0] >= -0.05  # Starts where the data does.


# -------------------------------------------------- writes that cannot clobber


def test_concurrent_runs_into_one_directory(tmp_path):
  out = tmp_path / 'runs'
  argv = [sys.executable, '-m', 'bnp_optax.experiments', 'run', *_TINY,
          '--epochs', '3', '--out', str(out)]
  procs = [subprocess.Popen(argv, cwd=_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=180) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], outputs
  loser = outputs[[p.returncode for p in procs].index(2)][1]
  assert 'another process' in loser or 'exists' in loser, loser
  assert len(_results(out)) == 1
  assert not [p for p in out.iterdir() if p.name.startswith('.')]


def test_write_json_is_exclusive(tmp_path):
  path = tmp_path / 'r.json'
  _files.write_json(path, {'a': 1}, replace=False)
  with pytest.raises(_files.ResultExists):
    _files.write_json(path, {'a': 2}, replace=False)
  assert json.loads(path.read_text()) == {'a': 1}
  _files.write_json(path, {'a': 3}, replace=True)
  assert json.loads(path.read_text()) == {'a': 3}
  assert [p.name for p in tmp_path.iterdir()] == ['r.json']


# ------------------------------------------------- validate before training


def _corrupt_mnist(root):
  fixtures.make_mnist(root / 'mnist')
  path = root / 'mnist' / 'train-images-idx3-ubyte.gz'
  data = bytearray(path.read_bytes())
  for i in range(20, 40):
    data[i] ^= 0xFF  # Flipped bytes inside the deflate stream.
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('extra,message', [
    (['--rho', '1.5'], '--rho must be in [0, 1), got 1.5'),
    (['--eps1', '-1'], '--eps1 must be a finite number >= 0'),
    (['--seeds', '-1'], '--seeds must be >= 0, got -1'),
    (['--test-subset', '0'], '--test-subset must be >= 1, got 0'),
    (['--train-subset', '-5'], '--train-subset must be >= 1, got -5'),
    (['--evals-per-epoch', '4'], 'more than the 3 steps per epoch'),
    (['--momentum', '1'], '--momentum must be in [0, 1)'),
    (['--lr', 'nan'], '--lr must be a finite number > 0'),
    (['--lr-decay-epochs', '5,2'], '--lr-decay-epochs must be increasing'),
    (['--methods', 'vanilla,nope'], "--methods: unknown method 'nope'"),
    (['OUT_IS_FILE'], 'is a file, not a directory'),
    (['OUT_UNDER_FILE'], 'cannot be created'),
    (['OUT_READ_ONLY'], 'is not writable'),
    (['PLOT_IS_DIR'], 'is a directory, not a file'),
    (['CORRUPT_GZ'], 'cannot read or decompress'),
])
def test_user_errors_before_training(extra, message, tmp_path):
  out = tmp_path / 'out'
  argv = ['run', '--methods', 'vanilla,bnp', '--epochs', '1',
          '--batch-size', '20', '--train-subset', '60', '--test-subset',
          '30']
  if extra == ['OUT_IS_FILE']:
    out.write_text('x')
  elif extra == ['OUT_UNDER_FILE']:
    (tmp_path / 'file').write_text('x')
    out = tmp_path / 'file' / 'out'
  elif extra == ['OUT_READ_ONLY']:
    out = pathlib.Path('/proc/bnp-optax-results')  # Read-only, even as root.
  elif extra == ['PLOT_IS_DIR']:
    argv += ['--plot', str(tmp_path)]
  elif extra == ['CORRUPT_GZ']:
    _corrupt_mnist(tmp_path / 'data')
    argv += ['--dataset', 'mnist', '--data-dir', str(tmp_path / 'data'),
             '--batch-size', '4', '--train-subset', '12']
  else:
    argv += extra
  before = sorted(tmp_path.rglob('*'))
  done = _cli_run(*argv, '--out', out)
  assert done.returncode == 2, (done.stdout, done.stderr)
  assert done.stderr.startswith('error: ') or '\nerror: ' in done.stderr
  assert message in done.stderr, done.stderr
  _no_traceback(done)
  assert 'train loss' not in done.stdout
  assert sorted(tmp_path.rglob('*')) == before  # Nothing written.


def test_corrupt_gzip_is_a_data_error(tmp_path):
  _corrupt_mnist(tmp_path)
  with pytest.raises(_data.DataError, match='decompress'):
    _data.load('mnist', tmp_path)


def test_a_suite_is_checked_before_its_first_run(tmp_path):
  # The third method's value is out of range: nothing trains.
  done = _cli_run('suite', 'digits', '--epochs', '1', '--train-subset', '60',
                  '--test-subset', '30', '--evals-per-epoch', '2',
                  '--steps-per-call', '0', '--out', tmp_path / 'o')
  assert done.returncode == 2 and '--steps-per-call' in done.stderr
  assert not (tmp_path / 'o').exists()


# ------------------------------------------------- signals and resume


def _start(out, *extra):
  argv = [sys.executable, '-m', 'bnp_optax.experiments', 'run', '--methods',
          'bnp', '--batch-size', '2', '--train-subset', '200',
          '--test-subset', '30', '--steps-per-call', '1', '--out', str(out),
          *extra]
  return subprocess.Popen(argv, cwd=_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for(proc, text, timeout=120):
  """Reads stdout until a line holds ``text``; returns what was read."""
  lines = []
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f'no {text!r} in {lines}')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(signum, tmp_path):
  out = tmp_path / 'runs'
  proc = _start(out, '--epochs', '200')
  _wait_for(proc, 'epoch 1.00')
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err
  assert 'Traceback' not in err and 'Segmentation' not in err, err
  assert 'interrupted' in err
  assert not _results(out)
  assert not [p for p in out.iterdir() if p.name != '.checkpoints']


def _history(result):
  return [{k: v for k, v in p.items() if k != 'time_s'}
          for p in result['history']]


def test_resume_is_bit_identical(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  config = _config.RunConfig(method='bnp', batch_size=10, epochs=2,
                             evals_per_epoch=2, train_subset=120,
                             test_subset=60)
  ds = _train.prepare_data(config, _data.load('digits'))
  whole = _train.train(config, ds, progress=False, log=None,
                       keep_state=True)
  calls = []

  def stop():
    calls.append(1)
    return signal.SIGINT if len(calls) > 3 else 0

  with pytest.raises(_train.Interrupted):
    _train.train(config, ds, progress=False, log=None, stop=stop,
                 checkpoint_dir=tmp_path / 'ckpt')
  resumed = _train.train(config, ds, progress=False, log=None,
                         checkpoint_dir=tmp_path / 'ckpt', resume=True,
                         keep_state=True)
  assert resumed['timing']['resumed_from_step'] == 18
  assert _history(resumed) == _history(whole)
  for a, b in zip(jax.tree.leaves(whole['state']),
                  jax.tree.leaves(resumed['state'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_cli_resume_after_sigint(tmp_path):
  args = ('--epochs', '3', '--checkpoint', 'always')
  done = _cli_run('run', '--methods', 'bnp', '--batch-size', '2',
                  '--train-subset', '200', '--test-subset', '30',
                  '--steps-per-call', '1', '--out', tmp_path / 'whole', *args)
  assert done.returncode == 0, done.stderr
  proc = _start(tmp_path / 'part', *args)
  _wait_for(proc, 'checkpoint saved')
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip('the run finished before the signal arrived')
  assert proc.returncode == 130
  done = _cli_run('run', '--methods', 'bnp', '--batch-size', '2',
                  '--train-subset', '200', '--test-subset', '30',
                  '--steps-per-call', '1', '--out', tmp_path / 'part', *args)
  assert done.returncode == 2 and '--resume' in done.stderr
  done = _cli_run('run', '--methods', 'bnp', '--batch-size', '2',
                  '--train-subset', '200', '--test-subset', '30',
                  '--steps-per-call', '1', '--out', tmp_path / 'part',
                  '--resume', *args)
  assert done.returncode == 0 and 'resumed' in done.stdout, done.stderr
  (a,), (b,) = _results(tmp_path / 'whole'), _results(tmp_path / 'part')
  assert a.name == b.name
  assert _history(json.loads(a.read_text())) == _history(
      json.loads(b.read_text()))
  assert not (tmp_path / 'part' / '.checkpoints').exists()


# ----------------------------------------------------------- downloads


def test_failed_checksum_does_not_block_the_next_download(
    tmp_path, http_server):
  www, url = http_server
  fixtures.make_mnist(www)
  good = {r.filename: hashlib.md5((www / r.filename).read_bytes()).hexdigest()
          for r in _data.RESOURCES['mnist']}
  resources = tuple(_data.Resource(name, (url + name,), md5)
                    for name, md5 in good.items())
  broken = www / 't10k-images-idx3-ubyte.gz'
  original = broken.read_bytes()
  broken.write_bytes(b'not the file')
  cache = tmp_path / 'cache'
  saved = _data.RESOURCES['mnist']
  _data.RESOURCES['mnist'] = resources
  try:
    with pytest.raises(_data.DataError, match='checksum mismatch'):
      _data.load('mnist', download=True, cache_dir=cache, quiet=True)
    broken.write_bytes(original)  # The mirror is fixed: retry.
    ds = _data.load('mnist', download=True, cache_dir=cache, quiet=True)
  finally:
    _data.RESOURCES['mnist'] = saved
  assert ds.x_test.shape[0] == 6
  # A cached file that went bad is downloaded again, not a dead end.
  (cache / 'mnist' / 'train-labels-idx1-ubyte.gz').write_bytes(b'x')
  _data.RESOURCES['mnist'] = resources
  try:
    ds = _data.load('mnist', download=True, cache_dir=cache, quiet=True)
  finally:
    _data.RESOURCES['mnist'] = saved
  assert ds.y_train.shape == (12,)


http_server = fixtures.http_server


# ------------------------------------------ progress output and dependencies


def test_no_progress_bar_fragments_in_logs(tmp_path):
  done = _cli_run('run', *_TINY, '--evals-per-epoch', '2', '--out', tmp_path)
  assert done.returncode == 0, done.stderr
  assert '\r' not in done.stdout + done.stderr
  assert 'it/s' not in done.stderr and 'step/s' not in done.stderr
  assert done.stdout.count('seed 0: epoch') == 2  # One line per evaluation.
  assert done.stdout.count('epoch 1.00') == 1


@pytest.mark.parametrize('module,argv,message', [
    ('matplotlib', ['plot', 'RUNS', '-o', 'OUT.png'], 'needs matplotlib'),
    ('sklearn', ['run', *_TINY, '--out', 'OUT'], 'needs scikit-learn'),
    ('orbax', ['run', *_TINY, '--checkpoint', 'always', '--out', 'OUT'],
     'needs orbax-checkpoint'),
])
def test_missing_dependency_names_the_extra(module, argv, message, tmp_path,
                                            one_result):
  _fake_runs(tmp_path / 'runs', one_result, [{}])
  argv = [a.replace('RUNS', str(tmp_path / 'runs')).replace(
      'OUT', str(tmp_path / 'out')) for a in argv]
  code = (f'import sys; sys.modules[{module!r}] = None; '
          f'sys.modules[{module + ".checkpoint"!r}] = None; '
          'from bnp_optax.experiments import main; '
          f'sys.exit(main({argv!r}))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=180, check=False, cwd=_ROOT)
  assert done.returncode == 2, done.stderr
  assert message in done.stderr
  assert "pip install 'bnp_optax[experiments]'" in done.stderr
  _no_traceback(done)


# ------------------------------------------------------------ main job


def test_main_job_replaces_its_results(tmp_path):
  scripts = tmp_path / 'scripts'
  scripts.mkdir()
  shutil.copy(_ROOT / 'scripts' / 'main_job.sh', scripts)
  # A stand-in for _venv.sh: this interpreter, no installation.
  (scripts / '_venv.sh').write_text(
      'set -euo pipefail\ncd "$(dirname "${BASH_SOURCE[0]}")/.."\n')
  old = tmp_path / 'results' / 'main-job' / 'digits'
  old.mkdir(parents=True)
  (old / 'stale-run.json').write_text('{}')
  env = dict(os.environ, PATH=f'{pathlib.Path(sys.executable).parent}:'
             + os.environ['PATH'], PYTHONPATH=str(_ROOT))
  args = ['--methods', 'bnp', '--epochs', '1', '--train-subset', '60',
          '--test-subset', '30']
  done = subprocess.run(['bash', str(scripts / 'main_job.sh'), *args],
                        capture_output=True, text=True, timeout=180,
                        check=False, env=env)
  assert done.returncode == 0, done.stderr
  names = [p.name for p in old.iterdir()]
  assert 'stale-run.json' not in names
  assert len([n for n in names if n.endswith('.json')]) == 1
  assert 'digits.png' in names
  # The last lines name the files where they are now, not the temporary
  # folder the harness wrote them into (issue 25).
  final = done.stdout[done.stdout.rindex('the files are:'):]
  assert 'results/main-job/digits/digits.png' in final, done.stdout
  assert f'results/main-job/digits/{names[0]}' in final or any(
      f'results/main-job/digits/{n}' in final for n in names)
  assert '.main-job.' not in final
  # A run that fails keeps the previous results.
  done = subprocess.run(['bash', str(scripts / 'main_job.sh'), '--rho', '2'],
                        capture_output=True, text=True, timeout=180,
                        check=False, env=env)
  assert done.returncode == 2
  assert sorted(p.name for p in old.iterdir()) == sorted(names)
  assert [p.name for p in (tmp_path / 'results').iterdir()] == ['main-job']
