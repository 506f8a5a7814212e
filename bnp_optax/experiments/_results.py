"""The result of a run: the JSON schema it is written in, read back, checked.

A run writes one JSON object (schema :data:`SCHEMA`): its ``name`` and
``group`` (the configuration's hash without the seed), ``created``, the
``config`` (the run's identity, see ``_config.canonical``, and what the
data and model turned out to be), the ``versions`` of everything that
affects the numbers, the ``history`` (one point per evaluation), the
``final`` point with ``diverged``, the ``timing`` and, for Figure 8, the
``conditioning`` rows.
"""

import datetime
import json
import math
import pathlib
import platform
import sys
from typing import Any

import flax
import jax
import numpy as np
import optax

import bnp_optax
from bnp_optax.experiments import _config
from bnp_optax.experiments import _data
from bnp_optax.experiments import _methods

SCHEMA = 'bnp_optax.experiments.run/2'

_REQUIRED = {
    'schema': str, 'name': str, 'group': str, 'created': str, 'config': dict,
    'versions': dict, 'history': list, 'final': dict, 'timing': dict,
}
_REQUIRED_CONFIG = ('model', 'dataset', 'method', 'batch_size', 'epochs',
                    'seed', 'learning_rate', 'learning_rate_source',
                    'optimizer', 'method_label')
_REQUIRED_POINT = ('epoch', 'step', 'train_loss', 'test_accuracy',
                   'test_loss', 'time_s')


def finite_or_none(value) -> float | None:
  """``value`` as a float, or None (JSON null) when it is not finite."""
  value = float(value)
  return value if math.isfinite(value) else None


def versions() -> dict[str, str]:
  """Versions of everything that affects the numbers."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {
      'bnp_optax': bnp_optax.__version__,
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'optax': optax.__version__,
      'numpy': np.__version__,
      'python': sys.version.split()[0],
      'platform': platform.platform(),
      'backend': jax.default_backend(),
      'device': getattr(device, 'device_kind', str(device)),
  }


def history_point(epoch: float, step: int, train_loss: float | None,
                  metrics: dict, time_s: float) -> dict[str, Any]:
  """One evaluation of the history.

  Args:
    epoch: the (fractional) epoch of the evaluation.
    step: the training steps taken.
    train_loss: the mean training loss since the previous evaluation
      (None at step 0); stored as None when it is not finite.
    metrics: ``test_accuracy``, ``test_loss`` and, with a held-out split,
      ``validation_accuracy`` and ``validation_loss``.
    time_s: training time so far (evaluations excluded).
  """
  return dict(
      epoch=epoch, step=step,
      train_loss=None if train_loss is None else finite_or_none(train_loss),
      test_accuracy=metrics['test_accuracy'], test_loss=metrics['test_loss'],
      time_s=time_s,
      **{k: v for k, v in metrics.items() if k.startswith('validation_')})


def run_result(config: _config.RunConfig, ds: _data.Dataset, timing: dict,
               history: list[dict], conditioning: list[dict], *,
               lr_source: str, num_params: int,
               steps_per_call: int) -> dict[str, Any]:
  """The JSON object of a finished run.

  Args:
    config: the run.
    ds: the data it trained and evaluated on.
    timing: seconds of ``total_s``, ``compile_s``, ``train_s``, ``data_s``
      (gathering batches), ``step_s`` (compiled calls) and ``eval_s``; the
      ``steps`` taken and ``resumed_from_step`` (or None).
    history: the :func:`history_point` s.
    conditioning: Figure 8's rows (stored only for a run that takes them).
    lr_source: where the learning rate comes from.
    num_params: the model's parameter count.
    steps_per_call: training steps per compiled call.
  """
  method = _methods.METHODS[config.method]
  steps = timing['steps']
  # A non-finite training or validation loss anywhere: the run diverged
  # (its parameters may be NaN while its accuracy still reads ~10%).
  diverged = any(p['train_loss'] is None for p in history[1:]) or any(
      'validation_loss' in p and p['validation_loss'] is None
      for p in history)
  cfg = _config.canonical(config)
  cfg.update(
      learning_rate_source=lr_source, method_label=method.label,
      norm=method.norm, bnp=method.bnp, num_train=len(ds.x_train),
      num_test=len(ds.x_test), num_classes=ds.num_classes,
      input_shape=list(ds.x_train.shape[1:]), data_source=ds.source,
      steps_per_epoch=len(ds.x_train) // config.batch_size,
      **({} if ds.x_val is None else dict(num_validation=len(ds.x_val))),
      resolved_steps_per_call=steps_per_call, num_params=num_params)
  result = {
      'schema': SCHEMA,
      'name': config.run_name(),
      'group': config.group_hash(),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'config': cfg,
      'versions': versions(),
      'history': history,
      'final': dict(train_loss=history[-1]['train_loss'],
                    test_accuracy=history[-1]['test_accuracy'],
                    diverged=diverged,
                    **{k: history[-1][k] for k in (
                        'validation_accuracy', 'validation_loss')
                       if k in history[-1]}),
      'timing': dict(
          total_s=timing['total_s'], compile_s=timing['compile_s'],
          train_s=timing['train_s'], data_s=timing['data_s'],
          step_s=timing['step_s'], eval_s=timing['eval_s'], steps=steps,
          data_us_per_step=1e6 * timing['data_s'] / max(steps, 1),
          step_us_per_step=1e6 * timing['step_s'] / max(steps, 1),
          resumed_from_step=timing['resumed_from_step']),
  }
  if config.conditioning_every:
    result['conditioning'] = conditioning
  return result


def check_result(result: Any) -> None:
  """Raises ValueError unless ``result`` follows the run JSON schema."""
  if not isinstance(result, dict):
    raise ValueError('a run result is a JSON object')
  for key, kind in _REQUIRED.items():
    if not isinstance(result.get(key), kind):
      raise ValueError(f'run result: {key!r} missing or not a '
                       f'{kind.__name__}')
  if result['schema'] != SCHEMA:
    raise ValueError(f'run result: schema {result["schema"]!r}, expected '
                     f'{SCHEMA!r}')
  missing = [k for k in _REQUIRED_CONFIG if k not in result['config']]
  if missing:
    raise ValueError(f'run result: config lacks {missing}')
  if not result['history']:
    raise ValueError('run result: empty history')
  for point in result['history']:
    missing = [k for k in _REQUIRED_POINT if k not in point]
    if missing:
      raise ValueError(f'run result: history point lacks {missing}')


def read_result(path) -> dict:
  """One run's JSON, checked.

  Raises:
    OSError: the file cannot be read.
    ValueError: it is not JSON or breaks the schema.
  """
  with open(path) as f:
    result = json.load(f)
  check_result(result)
  return result


def load_results(paths, *, on_skip=None) -> list[dict]:
  """Reads run JSONs from files and directories (searched recursively).

  Hidden files and directories (temporary files, checkpoints) are skipped,
  and so are the foreign files found in a directory: ``*.json`` that are
  not files, not readable, not UTF-8, not JSON, or JSON that is not a run
  result (no string ``schema`` of this harness); ``on_skip(path, why)`` is
  told of each. A file named in ``paths`` must be a run result.

  Args:
    paths: JSON files and directories.
    on_skip: called with the path and the reason of each file skipped.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: no run results, a named file that is not one, a result of
      an older schema, or a result that breaks the schema; the message
      names the file.
  """
  files = []
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      files += [(f, False) for f in sorted(
          f for f in p.rglob('*.json')
          if not any(part.startswith('.') for part in f.relative_to(p).parts))]
    elif p.is_file():
      files.append((p, True))
    else:
      raise FileNotFoundError(f'no such file or directory: {p}')
  results = []
  for f, named in files:
    try:
      result, why = _read_json(f), None
    except ValueError as e:
      result, why = None, str(e)
    schema = result.get('schema') if isinstance(result, dict) else None
    if why is None and not (isinstance(schema, str)
                            and schema.startswith('bnp_optax.experiments.')):
      why = 'not a run result (no run schema)'
    if why is not None:
      if named:
        raise ValueError(f'{f}: {why}')
      if on_skip is not None:
        on_skip(f, why)
      continue
    if schema == SCHEMA:
      try:
        check_result(result)
      except ValueError as e:
        raise ValueError(f'{f}: {e}') from e
      result['_path'] = str(f)
      results.append(result)
    elif schema.startswith('bnp_optax.experiments.run/'):
      raise ValueError(
          f'{f}: schema {schema!r} of an older version, whose runs lack '
          f'their full configuration; rerun it ({SCHEMA})')
    elif on_skip is not None:  # A sweep summary, say.
      on_skip(f, f'not a run result (schema {schema!r})')
  if not results:
    raise ValueError(f'no run results ({SCHEMA}) in {list(map(str, paths))}')
  return results


def _read_json(path: pathlib.Path):
  """The JSON in ``path``; ValueError saying why it cannot be read."""
  if not path.is_file():
    raise ValueError('not a file')
  try:
    text = path.read_bytes().decode('utf-8')
  except OSError as e:
    raise ValueError(f'cannot be read ({e.strerror})') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'not UTF-8 text ({e.reason} at byte {e.start})') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'not JSON ({e})') from None
