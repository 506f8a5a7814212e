"""Datasets: MNIST, CIFAR-10/100 from their official formats, offline digits.

Images are kept as ``uint8`` NHWC arrays (scaled to ``[0, 1]`` inside the
jit-compiled step), labels as ``int32``. Formats read:

- MNIST: the official IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not.
- CIFAR-10 / CIFAR-100: the official "python version" directory
  (``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch``;
  ``cifar-100-python/`` with ``train`` and ``test``), its ``.tar.gz``
  archive, or ``.npz`` arrays ``cifar10_train.npz``/``cifar10_test.npz``
  (``cifar100_*.npz``) holding ``x`` (uint8 NHWC) and ``y``.
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), an
  offline default that needs no download.

A data directory is searched as given and in its subdirectory named after the
dataset (``DIR/mnist``, ``DIR/cifar10``, ...). With ``download=True`` missing
files are fetched into a cache directory and checked against their published
MD5 before use.
"""

import dataclasses
import gzip
import hashlib
import os
import pathlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib

import numpy as np

DATASETS = ('digits', 'mnist', 'cifar10', 'cifar100')
NUM_CLASSES = {'digits': 10, 'mnist': 10, 'cifar10': 10, 'cifar100': 100}


class DataError(Exception):
  """A dataset is missing, corrupt or fails its checksum."""


@dataclasses.dataclass(frozen=True)
class Resource:
  """A file to download: its name, URLs (tried in order) and MD5."""

  filename: str
  urls: tuple[str, ...]
  md5: str


_MNIST_MIRRORS = (
    'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
)
RESOURCES = {
    'mnist': (
        Resource('train-images-idx3-ubyte.gz',
                 tuple(m + 'train-images-idx3-ubyte.gz'
                       for m in _MNIST_MIRRORS),
                 'f68b3c2dcbeaaa9fbdd348bbdeb94873'),
        Resource('train-labels-idx1-ubyte.gz',
                 tuple(m + 'train-labels-idx1-ubyte.gz'
                       for m in _MNIST_MIRRORS),
                 'd53e105ee54ea40749a09fcbcd1e9432'),
        Resource('t10k-images-idx3-ubyte.gz',
                 tuple(m + 't10k-images-idx3-ubyte.gz'
                       for m in _MNIST_MIRRORS),
                 '9fb629c4189551a2d022fa330f9573f3'),
        Resource('t10k-labels-idx1-ubyte.gz',
                 tuple(m + 't10k-labels-idx1-ubyte.gz'
                       for m in _MNIST_MIRRORS),
                 'ec29112dd5afa0611ce80d1b7f02629c'),
    ),
    'cifar10': (
        Resource('cifar-10-python.tar.gz',
                 ('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',),
                 'c58f30108f718f92721af3b95e74349a'),
    ),
    'cifar100': (
        Resource('cifar-100-python.tar.gz',
                 ('https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',),
                 'eb9058c3a382ffc7106e4002c42a8d85'),
    ),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test split of an image classification dataset.

  Attributes:
    name: the dataset's name.
    x_train: uint8 images, NHWC.
    y_train: int32 labels.
    x_test: uint8 images, NHWC.
    y_test: int32 labels.
    num_classes: number of classes.
    source: where it was read from.
    x_val: uint8 images held out of the training set (:func:`hold_out`),
      or None.
    y_val: their int32 labels, or None.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  source: str
  x_val: np.ndarray | None = None
  y_val: np.ndarray | None = None


def default_cache_dir() -> pathlib.Path:
  """``$BNP_OPTAX_DATA``, else ``$XDG_CACHE_HOME/bnp_optax`` (~/.cache)."""
  if os.environ.get('BNP_OPTAX_DATA'):
    return pathlib.Path(os.environ['BNP_OPTAX_DATA'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'bnp_optax'


def md5sum(path) -> str:
  h = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def download_resource(resource: Resource, directory, *, timeout: float = 60.0,
                      quiet: bool = False,
                      replace: bool = False) -> pathlib.Path:
  """Downloads ``resource`` into ``directory`` and checks its MD5.

  The file is written under a temporary name and renamed only when its
  checksum matches, so a failed or corrupt download never leaves a file that
  looks complete. An existing file with the right checksum is reused; one
  with another checksum is reported, or with ``replace=True`` downloaded
  again (and replaced only once the new copy checks out).

  Args:
    resource: what to fetch.
    directory: where to put it (created if needed).
    timeout: seconds per connection attempt.
    quiet: do not print progress.
    replace: download again over a file that fails its checksum.

  Returns:
    The path of the verified file.

  Raises:
    DataError: every URL failed, or the checksum does not match.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / resource.filename
  if target.exists():
    if md5sum(target) == resource.md5:
      return target
    if not replace:
      raise DataError(
          f'{target} exists but its MD5 is {md5sum(target)}, expected '
          f'{resource.md5}; delete it to download it again.')
  for stale in directory.glob('.download-*'):
    stale.unlink(missing_ok=True)  # Left by a killed download.
  errors = []
  for url in resource.urls:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.download-')
    os.close(fd)
    try:
      if not quiet:
        print(f'downloading {url}', flush=True)
      with urllib.request.urlopen(url, timeout=timeout) as r, open(
          tmp, 'wb') as f:
        shutil.copyfileobj(r, f)
      digest = md5sum(tmp)
      if digest != resource.md5:
        raise DataError(
            f'checksum mismatch for {url}: MD5 {digest}, expected '
            f'{resource.md5}')
      os.replace(tmp, target)
      return target
    except DataError as e:
      errors.append(str(e))
    except OSError as e:
      errors.append(f'{url}: {e}')
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  raise DataError(f'could not download {resource.filename}: ' +
                  '; '.join(errors))


# ---------------------------------------------------------------- MNIST (IDX)

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path) -> np.ndarray:
  """Reads an IDX file (gzipped if its name ends in ``.gz``)."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    # gzip raises zlib.error, not OSError, for some corrupt streams.
    raise DataError(f'{path}: cannot read or decompress ({e})') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DataError(f'{path}: not an IDX file (bad magic number)')
  dtype = _IDX_DTYPES.get(data[2])
  ndim = data[3]
  if dtype is None or ndim < 1:
    raise DataError(f'{path}: unsupported IDX type 0x{data[2]:02x} or rank '
                    f'{ndim}')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f'{path}: truncated IDX header')
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big')
                for i in range(ndim))
  size = int(np.prod(shape))
  if len(data) - header != size:
    raise DataError(f'{path}: IDX header says {shape} ({size} bytes) but '
                    f'the file holds {len(data) - header} bytes')
  return np.frombuffer(data, dtype, size, header).reshape(shape)


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (stem, stem + '.gz', stem.replace('-idx', '.idx'),
               stem.replace('-idx', '.idx') + '.gz'):
    if (directory / name).is_file():
      return directory / name
  return None


_MNIST_STEMS = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _load_mnist_dir(directory: pathlib.Path) -> Dataset | None:
  paths = [_find_idx(directory, s) for s in _MNIST_STEMS]
  if all(p is None for p in paths):
    return None
  missing = [s for s, p in zip(_MNIST_STEMS, paths) if p is None]
  if missing:
    raise DataError(f'{directory}: MNIST files missing: {missing}')
  xtr, ytr, xte, yte = (read_idx(p) for p in paths)
  for x, y, split in ((xtr, ytr, 'train'), (xte, yte, 't10k')):
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise DataError(f'{directory}: MNIST {split} images {x.shape} and '
                      f'labels {y.shape} do not match')
    if y.size and y.max() > 9:
      raise DataError(f'{directory}: MNIST {split} labels above 9')
  return Dataset('mnist', xtr[..., None], ytr.astype(np.int32),
                 xte[..., None], yte.astype(np.int32), 10, str(directory))


# ------------------------------------------------------------- CIFAR-10/100

_CIFAR_PY = {
    'cifar10': ('cifar-10-batches-py',
                tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',),
                b'labels'),
    'cifar100': ('cifar-100-python', ('train',), ('test',), b'fine_labels'),
}


def _unpickle(path: pathlib.Path) -> dict:
  try:
    with open(path, 'rb') as f:
      return pickle.load(f, encoding='bytes')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: not a CIFAR python batch ({e})') from e


def _cifar_batches(directory: pathlib.Path, names, label_key):
  xs, ys = [], []
  for name in names:
    batch = _unpickle(directory / name)
    try:
      x = np.asarray(batch[b'data'], np.uint8)
      y = np.asarray(batch[label_key], np.int32)
    except KeyError as e:
      raise DataError(f'{directory / name}: missing key {e}') from e
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
      raise DataError(f'{directory / name}: data {x.shape} and labels '
                      f'{y.shape} are not CIFAR batches')
    xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


def _load_cifar_python(name, directory: pathlib.Path) -> Dataset | None:
  sub, train_names, test_names, label_key = _CIFAR_PY[name]
  for d in (directory / sub, directory):
    if all((d / n).is_file() for n in train_names + test_names):
      xtr, ytr = _cifar_batches(d, train_names, label_key)
      xte, yte = _cifar_batches(d, test_names, label_key)
      return Dataset(name, xtr, ytr, xte, yte, NUM_CLASSES[name], str(d))
  return None


def _load_npz_pair(name, directory: pathlib.Path) -> Dataset | None:
  train, test = directory / f'{name}_train.npz', directory / f'{name}_test.npz'
  if not (train.is_file() and test.is_file()):
    return None
  arrays = []
  for path in (train, test):
    try:
      with np.load(path, allow_pickle=False) as f:
        x, y = np.asarray(f['x']), np.asarray(f['y'])
    except KeyError as e:
      raise DataError(f'{path}: expected arrays x and y, missing {e}') from e
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{path}: not a readable .npz file ({e})') from e
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
      raise DataError(f'{path}: expected x uint8 NHWC and y of the same '
                      f'length, got x {x.dtype} {x.shape}, y {y.shape}')
    if x.shape[-1] not in (1, 3):
      raise DataError(f'{path}: x is not NHWC (last axis {x.shape[-1]})')
    arrays += [x, y.astype(np.int32).reshape(-1)]
  if arrays[1].size and arrays[1].max() >= NUM_CLASSES[name]:
    raise DataError(f'{train}: labels above {NUM_CLASSES[name] - 1}')
  return Dataset(name, *arrays, NUM_CLASSES[name], str(directory))


def _extract(archive: pathlib.Path, directory: pathlib.Path) -> None:
  try:
    with tarfile.open(archive, 'r:*') as tar:
      root = directory.resolve()
      for member in tar.getmembers():
        dest = (directory / member.name).resolve()
        if (root not in dest.parents and dest != root) or not (
            member.isfile() or member.isdir()):
          raise DataError(f'{archive}: unsafe member {member.name!r}')
      if hasattr(tarfile, 'data_filter'):
        tar.extractall(directory, filter='data')
      else:
        tar.extractall(directory)  # Members checked above.
  except (tarfile.TarError, OSError, EOFError) as e:
    raise DataError(f'{archive}: cannot extract ({e})') from e


def _load_from(name: str, directory: pathlib.Path) -> Dataset | None:
  if name == 'mnist':
    return _load_mnist_dir(directory)
  found = _load_npz_pair(name, directory)
  if found is None:
    found = _load_cifar_python(name, directory)
  if found is None:
    archive = directory / RESOURCES[name][0].filename
    if archive.is_file():
      _extract(archive, directory)
      found = _load_cifar_python(name, directory)
  return found


def load_digits(test_fraction: float = 0.2, *, seed: int = 0) -> Dataset:
  """scikit-learn's bundled digits as 8x8x1 uint8 (0..255), split 80/20.

  Args:
    test_fraction: the share of the test split.
    seed: seed of the random split.

  Returns:
    The :class:`Dataset`.

  Raises:
    DataError: scikit-learn is not installed.
  """
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        "the offline 'digits' dataset needs scikit-learn: "
        "pip install 'bnp_optax[experiments]' (or 'bnp_optax[examples]')"
    ) from e
  digits = datasets.load_digits()
  x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = order[:n_test], order[n_test:]
  return Dataset('digits', x[train], y[train], x[test], y[test], 10,
                 'sklearn.datasets.load_digits')


def load(name: str, data_dir=None, *, download: bool = False,
         cache_dir=None, quiet: bool = False) -> Dataset:
  """Loads dataset ``name``.

  Args:
    name: one of :data:`DATASETS`.
    data_dir: a directory holding the dataset (searched as given and in its
      subdirectory ``name``). ``None``: the cache directory.
    download: fetch missing files into the cache directory (or ``data_dir``
      when given), checking their MD5.
    cache_dir: the cache directory; default :func:`default_cache_dir`.
    quiet: do not print download progress.

  Returns:
    The :class:`Dataset`.

  Raises:
    DataError: unknown dataset, missing directory or files, corrupt files,
      checksum mismatch.
  """
  if name not in DATASETS:
    raise DataError(f'unknown dataset {name!r}; expected one of {DATASETS}')
  if name == 'digits':
    return load_digits()
  if data_dir is not None:
    root = pathlib.Path(data_dir).expanduser()
    if not root.is_dir() and not download:
      raise DataError(f'data directory {root} does not exist')
  else:
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  candidates = (root, root / name)
  if download:
    for directory in candidates:
      if directory.is_dir():
        try:
          found = _load_from(name, directory)
        except DataError:
          found = None  # Incomplete or corrupt: downloaded again below.
        if found is not None:
          return found
    # Missing files are fetched and files failing their checksum replaced,
    # so a download that failed half way never blocks the next one.
    target = root / name
    for resource in RESOURCES[name]:
      download_resource(resource, target, quiet=quiet, replace=True)
    found = _load_from(name, target)
    if found is None:
      raise DataError(f'{target}: downloaded files do not hold {name}')
    return found
  for directory in candidates:
    if directory.is_dir():
      found = _load_from(name, directory)
      if found is not None:
        return found
  raise DataError(
      f'{name} not found in {root} or {root / name} (looked for '
      + ('the IDX files train-images-idx3-ubyte[.gz] etc.' if name == 'mnist'
         else f'{name}_train.npz/{name}_test.npz, '
         f'{_CIFAR_PY[name][0]}/ or {RESOURCES[name][0].filename}')
      + '); pass --data-dir, or --download on a machine with network')


def subset(ds: Dataset, train: int | None = None, test: int | None = None,
           seed: int = 0) -> Dataset:
  """A random subset (same for every run with the same seed).

  The test set is always shuffled (some copies are sorted by class), so a
  subset of it has every class.

  Args:
    ds: the dataset.
    train: number of training examples to keep, ``None`` for all.
    test: number of test examples to keep, ``None`` for all.
    seed: seed of the selection.

  Returns:
    The subset.
  """
  # Separate streams: the test subset does not depend on the train subset.
  tr = (np.random.default_rng([seed, 0]).permutation(len(ds.x_train))[:train]
        if train else None)
  te = np.random.default_rng([seed, 1]).permutation(len(ds.x_test))[:test]
  if train and train > len(ds.x_train):
    raise DataError(f'--train-subset {train} is larger than the {ds.name} '
                    f'training set ({len(ds.x_train)})')
  xtr = ds.x_train if tr is None else ds.x_train[np.sort(tr)]
  ytr = ds.y_train if tr is None else ds.y_train[np.sort(tr)]
  return dataclasses.replace(ds, x_train=xtr, y_train=ytr,
                             x_test=ds.x_test[te], y_test=ds.y_test[te])


def validation_indices(n_train: int, fraction: float,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The held-out and the remaining training indices, both sorted.

  A fixed random draw (its own stream, independent of the run's seed and of
  :func:`subset`), so every run of a sweep holds out the same examples.

  Args:
    n_train: the size of the full training set.
    fraction: the share held out, in ``(0, 1)``.
    seed: seed of the draw.

  Returns:
    ``(held_out, remaining)``, disjoint and covering ``range(n_train)``.

  Raises:
    DataError: the split would leave no held-out or no training example.
  """
  n_val = int(round(fraction * n_train))
  if not 0 < n_val < n_train:
    raise DataError(f'--validation-split {fraction} of {n_train} training '
                    f'examples holds out {n_val}: it must leave at least one '
                    'example on each side')
  order = np.random.default_rng([seed, 3]).permutation(n_train)
  return np.sort(order[:n_val]), np.sort(order[n_val:])


def hold_out(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
  """``ds`` with a held-out validation split taken from its training set.

  Args:
    ds: the full dataset (no split held out yet).
    fraction: the share of the training set held out, in ``(0, 1)``.
    seed: seed of the draw.

  Returns:
    The dataset with ``x_val, y_val`` the held-out examples and
    ``x_train, y_train`` the rest; the test set unchanged.
  """
  if ds.x_val is not None:
    raise DataError(f'{ds.name}: a validation split is already held out')
  val, rest = validation_indices(len(ds.x_train), fraction, seed)
  return dataclasses.replace(
      ds, x_train=ds.x_train[rest], y_train=ds.y_train[rest],
      x_val=ds.x_train[val], y_val=ds.y_train[val])
