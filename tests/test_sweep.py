"""Learning-rate sweeps: held-out split, selection, identities, CLI errors."""

import dataclasses
import json

import numpy as np
import pytest

from bnp_optax.experiments import _cli
from bnp_optax.experiments import _config
from bnp_optax.experiments import _data
from bnp_optax.experiments import _sweep
from bnp_optax.experiments import _train

# ---------------------------------------------------------- held-out split


def _indexed_dataset(n_train=1000, n_test=50):
  """Images that spell their own index (two pixels), to track examples."""

  def images(n):
    i = np.arange(n)
    return np.stack([i // 256, i % 256], 1).astype(np.uint8).reshape(
        n, 2, 1, 1)

  return _data.Dataset('digits', images(n_train), np.arange(n_train) % 10,
                       images(n_test), np.arange(n_test) % 10, 10, 'test')


def _ids(x):
  return x.reshape(len(x), 2).astype(int) @ np.array([256, 1])


def test_validation_split_is_disjoint_deterministic_and_seed_free():
  ds = _indexed_dataset()
  config = _config.RunConfig(validation_split=0.2, train_subset=300,
                             batch_size=10)
  a = _train.prepare_data(config, ds)
  # Another seed and method: the same held-out examples.
  b = _train.prepare_data(dataclasses.replace(config, seed=7, method='bn'),
                          ds)
  val, train = _ids(a.x_val), _ids(a.x_train)
  assert len(val) == 200 and len(train) == 300
  assert not set(val) & set(train)
  np.testing.assert_array_equal(val, _ids(b.x_val))
  np.testing.assert_array_equal(train, _ids(b.x_train))
  # The labels travel with their images; the test set is untouched.
  np.testing.assert_array_equal(a.y_val, val % 10)
  assert sorted(_ids(a.x_test).tolist()) == list(range(50))
  held, rest = _data.validation_indices(1000, 0.2)
  np.testing.assert_array_equal(held, val)
  assert sorted(np.concatenate([held, rest]).tolist()) == list(range(1000))
  # Without a subset, training uses every example that is not held out.
  full = _train.prepare_data(dataclasses.replace(config, train_subset=None),
                             ds)
  np.testing.assert_array_equal(_ids(full.x_train), rest)


def test_split_must_leave_examples_on_both_sides():
  with pytest.raises(_data.DataError, match='at least one'):
    _data.validation_indices(10, 0.01)
  ds = _indexed_dataset(100)
  with pytest.raises(_data.DataError, match='already held out'):
    _data.hold_out(_data.hold_out(ds, 0.1), 0.1)
  with pytest.raises(ValueError, match='holds none'):
    _train.check_data(_config.RunConfig(validation_split=0.1), ds)


# -------------------------------------------------------------- identities


def test_new_fields_leave_published_identities_unchanged():
  assert _config.RunConfig().group_hash() == '2c8ca55cb9'
  identity = _config.canonical(_config.RunConfig())
  assert 'validation_split' not in identity and 'bnp_q' not in identity
  split = _config.RunConfig(validation_split=0.1)
  assert _config.canonical(split)['validation_split'] == 0.1
  assert split.group_hash() != '2c8ca55cb9'
  assert _config.RunConfig(method='bnp', bnp_q='no_conv').group_hash() != (
      '2c8ca55cb9')


# --------------------------------------------------------------- selection


def test_select_best_is_the_held_out_argmax():
  assert _sweep.select_best({0.1: (0.8, False), 1.0: (0.9, False),
                             10.0: (0.5, False)}) == 1.0
  # A diverged rate never wins, whatever its accuracy.
  assert _sweep.select_best({0.1: (0.8, False), 1.0: (0.99, True)}) == 0.1
  assert _sweep.select_best({0.1: (0.8, False), 1.0: (None, False)}) == 0.1
  # Ties go to the smaller rate.
  assert _sweep.select_best({0.3: (0.9, False), 0.1: (0.9, False),
                             1.0: (0.9, False)}) == 0.1
  assert _sweep.select_best({0.1: (0.9, True), 1.0: (0.2, True)}) is None


def _fake(method, lr, seed, val, test, diverged=False, train_loss=0.5):
  config = _config.RunConfig(method=method, learning_rate=lr, seed=seed,
                             validation_split=0.1)
  return dict(name=config.run_name(), config=_config.canonical(config) | dict(
      num_validation=144), history=[dict(validation_loss=2.3)], final=dict(
          validation_accuracy=val, test_accuracy=test, train_loss=train_loss,
          diverged=diverged))


def test_summary_reads_held_out_accuracy_only():
  # The test accuracy is highest where the held-out one is lowest.
  runs = [_fake('bnp', 0.1, s, 0.9, 0.1) for s in (0, 1)]
  runs += [_fake('bnp', 1.0, s, 0.5, 0.99) for s in (0, 1)]
  runs += [_fake('bnp', 10.0, 0, 0.95, 0.99, diverged=True),
           _fake('bnp', 10.0, 1, 0.95, 0.99)]
  runs += [_fake('vanilla', 0.1, s, 0.7 + 0.1 * s, 0.2) for s in (0, 1)]
  # Finite, but it ended above the untrained network's loss: diverged.
  runs += [_fake('vanilla', 1.0, s, 0.99, 0.99, train_loss=1e30)
           for s in (0, 1)]
  summary = _sweep.summarize(runs, {'bnp': (0.1, 1.0, 10.0),
                                    'vanilla': (0.1, 1.0)})
  bnp = summary['methods']['bnp']
  assert bnp['best_learning_rate'] == 0.1
  assert bnp['best']['test_accuracy_mean'] == pytest.approx(0.1)
  assert [r['diverged'] for r in bnp['rows']] == [False, False, True]
  assert bnp['rows'][2]['diverged_seeds'] == [0]
  vanilla = summary['methods']['vanilla']
  assert vanilla['best_learning_rate'] == 0.1
  assert vanilla['rows'][1]['diverged_seeds'] == [0, 1]
  assert vanilla['best']['validation_accuracy_mean'] == pytest.approx(0.75)
  table = _sweep.format_table(summary)
  assert 'div' in table and 'vanilla' in table
  json.dumps(summary, allow_nan=False)
  with pytest.raises(ValueError, match='no run of bnp'):
    _sweep.summarize(runs, {'bnp': (0.1, 3.0)})


def test_sweep_selects_on_held_out_data_not_the_test_set(
    tmp_path, monkeypatch, capsys):
  real = _data.load_digits

  def scrambled(*args, **kwargs):
    ds = real(*args, **kwargs)
    rng = np.random.default_rng(0)
    return dataclasses.replace(ds, y_test=rng.permutation(ds.y_test))

  monkeypatch.setattr(_data, 'load_digits', scrambled)
  summary_path = tmp_path / 'summary.json'
  status = _cli.main([
      'run', '--methods', 'bnp', '--lr-grid', '0.003,0.5,1e30',
      '--validation-split', '0.2', '--epochs', '1', '--batch-size', '20',
      '--out', str(tmp_path / 'runs'),
      '--sweep-summary', str(summary_path), '--no-progress'])
  out = capsys.readouterr().out
  assert status == 0, out
  assert 'held-out accuracy' in out
  summary = json.loads(summary_path.read_text())
  assert summary['schema'] == _sweep.SCHEMA
  assert summary['num_validation'] == round(0.2 * len(real().x_train))
  runs = {}
  for f in (tmp_path / 'runs').glob('*.json'):
    result = json.loads(f.read_text())
    assert result['config']['validation_split'] == 0.2
    assert result['config']['num_train'] == len(real().x_train) - (
        summary['num_validation'])
    point = result['history'][-1]
    assert {'validation_accuracy', 'test_accuracy'} <= set(point)
    runs[result['config']['learning_rate']] = result['final']
  assert sorted(runs) == [0.003, 0.5, 1e30]
  assert runs[1e30]['diverged']
  finite = {lr: f['validation_accuracy'] for lr, f in runs.items()
            if not f['diverged']}
  best = summary['methods']['bnp']['best_learning_rate']
  assert best == max(finite, key=finite.get) == 0.5
  # It learned (held out) while the scrambled test set says chance.
  assert runs[best]['validation_accuracy'] > 0.5
  assert runs[best]['test_accuracy'] < 0.25


@pytest.mark.parametrize('flags,message', [
    (['--lr-grid', '0.1,abc'], 'not a number'),
    (['--lr-grid', '0.1,-1'], 'finite and > 0'),
    (['--lr-grid', '0.1,inf'], 'finite and > 0'),
    (['--lr-grid', '0.1,0.1'], 'given twice'),
    (['--lr-grid', ','], 'no rates'),
    (['--lr-grid', 'adam:0.1'], 'not one of the methods'),
    (['--lr-grid', '0.1', '--lr-grid', '1'], 'two grids'),
    (['--lr-grid', 'bnp:0.1', '--lr-grid', 'bnp:1'], 'two grids'),
    (['--lr-grid', 'bnp:0.1'], 'no grid for vanilla'),
    (['--lr-grid', '0.1', '--lr', '0.1'], 'exclude each other'),
    (['--lr-grid', '0.1', '--validation-split', '0'], 'must be > 0'),
    (['--lr-grid', '0.1', '--validation-split', '1.5'], 'in [0, 1)'),
    (['--sweep-summary', 'x.json'], 'needs --lr-grid'),
])
def test_bad_grid_is_a_usage_error(flags, message, tmp_path, capsys):
  status = _cli.main(['run', '--methods', 'vanilla,bnp', '--out',
                      str(tmp_path), '--no-progress'] + flags)
  err = capsys.readouterr().err
  assert status == 2 and message in err, err
  assert not list(tmp_path.iterdir())  # Nothing trained or written.
