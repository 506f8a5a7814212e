"""The harness as a newcomer meets it (issues 20 and 25).

What the commands print (final paths, step times, the rerun advice, the
rates used), `plot` on foreign files and without a figure, readable short
plots, and run locks held around each run only.
"""

import csv
import os
import re
import signal
import socket

import pytest

from bnp_optax.experiments import _cli
from bnp_optax.experiments import _data
from bnp_optax.experiments import _files
from bnp_optax.experiments import _plot
from bnp_optax.experiments import _train

_TINY = ['--methods', 'bnp', '--epochs', '1', '--batch-size', '20',
         '--train-subset', '60', '--test-subset', '30', '--no-progress']


def _main(argv, capsys):
  status = _cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture(scope='module')
def tiny_runs(tmp_path_factory):
  """Two seeds of a tiny run on the offline digits."""
  out = tmp_path_factory.mktemp('runs')
  assert _cli.main(['run', *_TINY, '--seeds', '0,1', '--out', str(out)]) == 0
  return out


def _dead_pid():
  pid = 2 ** 22 - 7
  while True:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return pid
    except PermissionError:
      pass
    pid -= 1


# ------------------------------------------------------- what is printed


def test_list_shows_only_rates_of_datasets_the_harness_has(capsys):
  status, out, _ = _main(['list'], capsys)
  assert status == 0
  rates = out[out.index("the paper's learning rates"):]
  assert 'imagenet' not in rates
  assert 'mnist' in rates and 'cifar100' in rates


def test_rerun_error_leads_with_skip_existing(tiny_runs, capsys):
  status, _, err = _main(['run', *_TINY, '--seeds', '0,1', '--out',
                          tiny_runs], capsys)
  assert status == 2
  first_line = err.splitlines()[0]
  assert first_line.startswith(
      'error: 2 of the 2 planned run(s) finished before'), err
  assert first_line.index('--skip-existing') < first_line.index('First:')
  status, out, _ = _main(['run', *_TINY, '--seeds', '0,1,2',
                          '--skip-existing', '--out', tiny_runs], capsys)
  assert status == 0 and out.count('kept ') == 2


def test_step_times_print_in_units_a_person_reads(tmp_path, capsys):
  status, out, _ = _main(['run', *_TINY, '--out', tmp_path], capsys)
  assert status == 0
  (line,) = [s for s in out.splitlines() if 'compiled step' in s]
  assert re.search(r'compiled step [0-9.]+ (us|ms|s);', line), line
  assert _cli.human_time(0.894351) == '894 ms'
  assert _cli.human_time(0.0009999) == '1 ms'
  assert _cli.human_time(12.0) == '12 s'


# ---------------------------------------------------------------- plot


def test_plot_table_only_and_csv(tiny_runs, tmp_path, capsys):
  table = tmp_path / 'summary.csv'
  status, out, err = _main(['plot', tiny_runs, '--csv', table], capsys)
  assert status == 0, err
  assert 'figure:' not in out and 'test acc' in out
  assert not list(tmp_path.glob('*.png'))
  with table.open() as f:
    (row,) = list(csv.DictReader(f))
  assert row['method'] == 'bnp'
  assert row['seeds'] == str(len(list(tiny_runs.glob('*.json'))))
  assert 0 <= float(row['test_accuracy_mean']) <= 100
  assert f'table: {table}' in out


def test_plot_skips_and_names_foreign_files(tiny_runs, tmp_path, capsys):
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  for f in tiny_runs.glob('*.json'):
    (mixed / f.name).write_bytes(f.read_bytes())
  (mixed / 'schema-number.json').write_text('{"schema": 3}')
  (mixed / 'a-list.json').write_text('[1, 2]')
  (mixed / 'folder.json').mkdir()
  (mixed / 'latin1.json').write_bytes(b'{"name": "\xe9t\xe9"}')
  (mixed / 'broken.json').write_text('{"schema": ')
  status, out, err = _main(['plot', mixed], capsys)
  assert status == 0, err
  assert 'Traceback' not in err
  for name in ('schema-number.json', 'a-list.json', 'folder.json',
               'latin1.json', 'broken.json'):
    assert re.search(rf'skipped \S*{name}: ', err), (name, err)
  assert 'bnp' in out
  # A foreign file named on the command line is an error naming it.
  status, _, err = _main(['plot', mixed / 'latin1.json'], capsys)
  assert status == 2
  assert 'latin1.json: not UTF-8' in err and 'Traceback' not in err
  status, _, err = _main(['plot', mixed / 'schema-number.json'], capsys)
  assert status == 2 and 'schema-number.json: not a run result' in err


def test_short_runs_show_every_point_on_the_accuracy_axis():
  # One epoch, one evaluation: the untrained network's 10% at epoch 0 and
  # 90% after it; both on the axis.
  lo, hi = _plot.accuracy_limits([10.0, 90.0], [90.0], 2)
  assert lo < 10.0 and hi > 90.0
  # A long run zooms on the accuracies after epoch 0.
  values = [10.0] + [90.0 + i / 10 for i in range(30)]
  lo, _ = _plot.accuracy_limits(values, values[1:], 31)
  assert lo > 80.0


# --------------------------------------------------------------- locks


def test_each_run_is_locked_only_while_it_trains(tmp_path, capsys,
                                                monkeypatch):
  out = tmp_path / 'runs'
  seen = []
  real_train = _train.train

  def train(config, *args, **kwargs):
    seen.append(sorted(p.name for p in out.glob('.*.lock')))
    return real_train(config, *args, **kwargs)

  monkeypatch.setattr(_train, 'train', train)
  status, _, err = _main(['run', *_TINY, '--seeds', '0,1', '--out', out],
                         capsys)
  assert status == 0, err
  assert [len(locks) for locks in seen] == [1, 1], seen
  assert seen[0] != seen[1]
  assert not list(out.glob('.*.lock'))


def test_rerun_removes_stale_locks_of_finished_runs(tmp_path, capsys):
  # A SIGKILLed invocation leaves its locks; a rerun that keeps the
  # finished runs removes theirs too.
  status, _, err = _main(['run', *_TINY, '--out', tmp_path], capsys)
  assert status == 0, err
  (result,) = tmp_path.glob('*.json')
  stale = tmp_path / f'.{result.stem}.lock'
  stale.write_text(f'{socket.gethostname()} {_dead_pid()}\n')
  status, out, err = _main(['run', *_TINY, '--skip-existing', '--out',
                            tmp_path], capsys)
  assert status == 0 and 'kept' in out, err
  assert not stale.exists()


def test_a_lost_lock_race_never_deletes_the_winners_directory(
    tmp_path, capsys, monkeypatch):
  """Both found --out missing; the winner wrote first; the loser fails."""
  out = tmp_path / 'new'

  def winner_first(self):
    out.mkdir(exist_ok=True)
    (out / 'winner.json').write_text('{}')
    raise _files.FileError(f'another process is writing into {out}')

  monkeypatch.setattr(_files.Lock, 'acquire', winner_first)
  monkeypatch.setattr(_files.Lock, 'check', winner_first, raising=False)
  status, _, err = _main(['run', *_TINY, '--out', out], capsys)
  assert status == 2 and 'another process' in err
  assert (out / 'winner.json').exists()


def test_a_live_lock_is_an_error_before_training_and_is_kept(tmp_path,
                                                             capsys):
  out = tmp_path / 'new'
  name = _train.RunConfig(
      method='bnp', epochs=1, batch_size=20, train_subset=60,
      test_subset=30).run_name()
  status, _, err = _main(['run', *_TINY, '--out', out], capsys)
  assert status == 0, err
  (out / f'{name}.json').unlink()
  # A live owner: this process's parent.
  (out / f'.{name}.lock').write_text(
      f'{socket.gethostname()} {os.getppid()}\n')
  status, text, err = _main(['run', *_TINY, '--out', out], capsys)
  assert status == 2 and 'another process' in err
  assert 'epoch' not in text
  assert (out / f'.{name}.lock').exists()  # Not ours to remove.


# ------------------------------------------------ resume, interrupts, progress

_CKPT_ARGS = ['--methods', 'bnp', '--batch-size', '10', '--epochs', '2',
              '--evals-per-epoch', '2', '--train-subset', '120',
              '--test-subset', '60', '--no-progress', '--checkpoint', 'always']


def _interrupted_checkpoint(out, **overrides):
  """An interrupted run's checkpoint, where _CKPT_ARGS's run looks for it.

  ``overrides`` make it the checkpoint of another configuration.
  """
  wanted = _train.RunConfig(method='bnp', batch_size=10, epochs=2,
                            evals_per_epoch=2, train_subset=120,
                            test_subset=60)
  config = _train.RunConfig(**{**dict(
      method='bnp', batch_size=10, epochs=2, evals_per_epoch=2,
      train_subset=120, test_subset=60), **overrides})
  ds = _train.prepare_data(config, _data.load('digits'))
  calls = []

  def stop():
    calls.append(1)
    return signal.SIGINT if len(calls) > 3 else 0

  ckpt = out / '.checkpoints' / wanted.run_name()
  with pytest.raises(_train.Interrupted):
    _train.train(config, ds, progress=False, log=None, stop=stop,
                 checkpoint_dir=ckpt)
  return ckpt


def _largest_file(directory):
  return max((p for p in directory.rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


@pytest.mark.parametrize('damage', ['truncated', 'no_manifest',
                                    'no_metadata', 'other_config'])
def test_resume_refuses_a_bad_checkpoint_before_training(
    damage, tmp_path, capsys):
  out = tmp_path / 'runs'
  ckpt = _interrupted_checkpoint(
      out, **(dict(rho=0.9) if damage == 'other_config' else {}))
  (step_dir,) = [d for d in ckpt.iterdir() if d.name.isdigit()]
  if damage == 'truncated':
    victim = _largest_file(step_dir)
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])
    expected = 'truncated or changed'
  elif damage == 'no_manifest':
    for manifest in ckpt.glob('manifest-*.json'):
      manifest.unlink()
    expected = 'manifest'
  elif damage == 'no_metadata':
    victim = next(p for p in step_dir.rglob('*')
                  if p.is_file() and 'metadata' in p.name.lower())
    victim.unlink()
    expected = f'{victim.name} is missing'
  else:
    expected = 'another configuration (differs in rho)'
  status, out_text, err = _main(['run', *_CKPT_ARGS, '--resume', '--out',
                                 out], capsys)
  assert status == 2, (out_text, err)
  assert err.startswith('error: ') and expected in err, err
  assert str(ckpt) in err and '--overwrite' in err
  assert 'Traceback' not in err and 'epoch' not in out_text
  # --overwrite starts it again.
  status, _, err = _main(['run', *_CKPT_ARGS, '--overwrite', '--out', out],
                         capsys)
  assert status == 0, err


def test_resume_continues_from_a_good_checkpoint(tmp_path, capsys):
  out = tmp_path / 'runs'
  _interrupted_checkpoint(out)
  status, text, err = _main(['run', *_CKPT_ARGS, '--resume', '--out', out],
                            capsys)
  assert status == 0, err
  assert 'continues from its checkpoint at step' in text


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
  status, out, err = _main(['run', *_TINY, '--resume', '--out', tmp_path],
                           capsys)
  assert status == 0, err
  assert 'starts from step 0' in out and '--checkpoint always' in out
  status, out, err = _main(['run', *_CKPT_ARGS, '--resume', '--out',
                            tmp_path / 'other'], capsys)
  assert status == 0, err
  assert 'has no checkpoint' in out and 'starts from step 0' in out


def test_interrupt_says_what_was_lost_and_how_to_keep_it(
    tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    e = _train.Interrupted(signal.SIGINT)
    e.step = 5
    raise e

  monkeypatch.setattr(_train, 'train', interrupted)
  status, _, err = _main(['run', *_TINY, '--out', tmp_path], capsys)
  assert status == 130
  assert '(5 steps) is lost' in err and '--checkpoint always' in err
  assert '--resume' in err


def test_progress_by_steps_without_a_bar(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(_train, 'PROGRESS_EVERY_S', 0.0)
  status, out, err = _main(['run', *_TINY, '--steps-per-call', '1',
                            '--out', tmp_path], capsys)
  assert status == 0, err
  steps = re.findall(r'step (\d+)/3 ', out)
  assert steps == ['1', '2', '3'], out
