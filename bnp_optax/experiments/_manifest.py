"""What a run's checkpoint must be before anything trains from it.

Each checkpoint (one orbax step directory) gets a manifest beside it,
``manifest-STEP.json``: the identity of the run that wrote it (its full
configuration, seed included) and the size and SHA-256 of every file of
the step. :func:`probe` checks a checkpoint directory against the run that
wants to resume from it, before the data is loaded or a step compiled: a
checkpoint of another configuration, a missing or truncated file, missing
metadata or manifest are each reported by name, never left to orbax or
TensorStore to fail on halfway through.
"""

import hashlib
import json
import os
import pathlib
from typing import Any


class CheckpointError(Exception):
  """A checkpoint that cannot be resumed from; the message says why."""


def _manifest_path(directory: pathlib.Path, step: int) -> pathlib.Path:
  return directory / f'manifest-{step}.json'


def _digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, list]:
  return {str(p.relative_to(step_dir)): [p.stat().st_size, _digest(p)]
          for p in sorted(step_dir.rglob('*')) if p.is_file()}


def write(directory, step: int, identity: dict[str, Any]) -> None:
  """Writes the manifest of the checkpoint ``step`` just saved in it."""
  directory = pathlib.Path(directory)
  manifest = dict(identity=identity, step=step,
                  files=_files(directory / str(step)))
  path = _manifest_path(directory, step)
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(json.dumps(manifest, sort_keys=True))
  os.replace(tmp, path)
  for old in directory.glob('manifest-*.json'):
    if old != path:
      old.unlink(missing_ok=True)


def _steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir()
                if p.is_dir() and p.name.isdigit())


def probe(directory, identity: dict[str, Any]) -> int | None:
  """The step to resume from, checked; None when there is no checkpoint.

  Args:
    directory: the run's checkpoint directory.
    identity: the resuming run's identity (``_config.canonical``).

  Returns:
    the step of the last checkpoint, or None when the directory holds none
    (a run interrupted before its first evaluation).

  Raises:
    CheckpointError: the checkpoint is another configuration's, or
      damaged (a file missing, truncated or changed, no metadata, no
      manifest).
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return None
  steps = _steps(directory)
  if not steps:
    return None
  step = steps[-1]
  path = _manifest_path(directory, step)
  try:
    manifest = json.loads(path.read_text())
    stored_identity, files = manifest['identity'], manifest['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    why = ('missing' if isinstance(e, FileNotFoundError)
           else f'unreadable ({e})')
    raise CheckpointError(
        f'the checkpoint at step {step} in {directory} has no usable '
        f'manifest ({path.name} {why}): damaged, or written by another '
        'version') from None
  if json.dumps(stored_identity, sort_keys=True) != json.dumps(
      identity, sort_keys=True):
    differ = sorted(k for k in set(identity) | set(stored_identity)
                    if identity.get(k) != stored_identity.get(k))
    raise CheckpointError(
        f'the checkpoint in {directory} is of another configuration '
        f'(differs in {", ".join(differ)})')
  step_dir = directory / str(step)
  present = _files(step_dir)
  for name, (size, digest) in files.items():
    if name not in present:
      raise CheckpointError(
          f'the checkpoint at step {step} in {directory} is damaged: '
          f'{name} is missing')
    if present[name] != [size, digest]:
      raise CheckpointError(
          f'the checkpoint at step {step} in {directory} is damaged: '
          f'{name} was truncated or changed ({present[name][0]} bytes, '
          f'{size} written)')
  return step
