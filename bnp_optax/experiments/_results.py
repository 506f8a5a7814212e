"""The result of a run: the JSON schema it is written in, read back, checked.

A run writes one JSON object (schema :data:`SCHEMA`): its ``name`` and
``group`` (the configuration's hash without the seed), ``created``, the
``config`` (the run's identity, see ``_config.canonical``, and what the
data and model turned out to be), the ``versions`` of everything that
affects the numbers, the ``history`` (one point per evaluation), the
``final`` point with ``diverged``, the ``timing`` and, for Figure 8, the
``conditioning`` rows.
"""

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


def load_results(paths) -> list[dict]:
  """Reads run JSONs from files and directories (searched recursively).

  Hidden files and directories (temporary files, checkpoints) are skipped,
  and so are JSON files that are not run results.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: no run results, a result of an older schema, or a result
      that breaks the schema.
  """
  files = []
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      files += sorted(
          f for f in p.rglob('*.json')
          if not any(part.startswith('.') for part in f.relative_to(p).parts))
    elif p.is_file():
      files.append(p)
    else:
      raise FileNotFoundError(f'no such file or directory: {p}')
  results = []
  for f in files:
    with open(f) as fh:
      try:
        result = json.load(fh)
      except json.JSONDecodeError as e:
        raise ValueError(f'{f}: not JSON ({e})') from e
    schema = result.get('schema', '') if isinstance(result, dict) else ''
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
  if not results:
    raise ValueError(f'no run results ({SCHEMA}) in {list(paths)}')
  return results
