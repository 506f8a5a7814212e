"""File safety: output probes, run locks and atomic result writes.

Every check here runs before the first training step (the CLI plans the
runs first), so a user error is reported having written nothing; results
are written so that readers never see half a file and no existing result
is replaced silently.
"""

import json
import os
import pathlib
import shutil
import socket
import uuid


class FileError(Exception):
  """An output location that cannot be used, reported before training."""


class ResultExists(Exception):
  """The result appeared while this run trained (another writer)."""


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
  path = path.absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def check_writable_dir(path: pathlib.Path, what: str) -> None:
  """Raises FileError unless ``path`` is a directory that takes files.

  Args:
    path: the directory; it may not exist yet if it can be created.
    what: how the message names it (e.g. ``'--out'``).
  """
  if path.exists() and not path.is_dir():
    raise FileError(f'{what} {path} is a file, not a directory')
  base = _nearest_existing(path)
  if not base.is_dir():
    raise FileError(f'{what} {path} cannot be created: {base} is a file')
  # A probe, not os.access: root passes os.access on read-only mounts.
  probe = base / f'.bnp-probe-{uuid.uuid4().hex}'
  try:
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise FileError(f'{what} {path} is not writable: cannot create files '
                    f'in {base} ({e.strerror})') from None
  if shutil.disk_usage(base).free < (16 << 20):
    raise FileError(f'{what} {path}: the file system of {base} is full')


def check_output_file(path: pathlib.Path, what: str) -> None:
  """Raises FileError unless ``path`` can be written as a file."""
  if path.is_dir():
    raise FileError(f'{what} {path} is a directory, not a file')
  check_writable_dir(path.parent, f'the directory of {what}')


class Lock:
  """An exclusive lock on one run's result, held while it trains.

  The lock is a file created exclusively, holding the host and process id
  of its owner; a lock whose process is gone (on this host) is stale and
  taken over.
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.held = False

  def _held_by_another(self, owner):
    return FileError(
        f'another process ({owner}) is writing the run of '
        f'{self.path.name[1:-5]} into {self.path.parent}; wait for it to '
        f'finish (or remove {self.path} if it is gone)')

  def check(self):
    """Raises FileError when another live process holds the lock.

    A stale lock (its process gone) is removed.
    """
    if not os.path.lexists(self.path):
      return
    owner = self._owner()
    if owner is None:
      self.path.unlink(missing_ok=True)
      return
    raise self._held_by_another(owner)

  def acquire(self):
    """Takes the lock; raises FileError when another process holds it."""
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is None:  # Its process is gone: a stale lock.
          self.path.unlink(missing_ok=True)
          continue
        raise self._held_by_another(owner) from None
      with os.fdopen(fd, 'w') as f:
        f.write(f'{socket.gethostname()} {os.getpid()}\n')
      self.held = True
      return
    raise FileError(f'cannot take the lock {self.path}')

  def _owner(self):
    try:
      host, pid = self.path.read_text().split()
      pid = int(pid)
    except (OSError, ValueError):
      return 'unknown process'  # Being written right now, or not ours.
    if host != socket.gethostname():
      return f'pid {pid} on {host}'
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return f'pid {pid}'

  def release(self):
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False


def write_json(path: pathlib.Path, result: dict, *, replace: bool) -> None:
  """Writes ``result`` atomically, and exclusively unless ``replace``.

  The JSON goes to a temporary file in the same directory, created with
  mode 0666 less the umask, then becomes ``path`` in one step: a hard link
  that fails if ``path`` exists (or a rename with ``replace``), so readers
  never see half a file and no existing result is replaced silently.

  Args:
    path: the result file.
    result: the JSON object.
    replace: replace an existing ``path``.

  Raises:
    ResultExists: ``path`` exists and ``replace`` is false.
  """
  tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp'
  fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(result, f, indent=1, allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    if replace:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)
      except FileExistsError:
        raise ResultExists(str(path)) from None
  finally:
    tmp.unlink(missing_ok=True)
