"""Loaders of bnp_optax.experiments on fixtures in the official formats."""

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest

from bnp_optax.experiments import _data


def write_idx(path, array):
  """Writes ``array`` (uint8) as an IDX file, gzipped if path ends in .gz."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  data = header + array.tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(data)


def make_mnist(directory, *, gz=True, n_train=12, n_test=6, seed=0):
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {
      'train-images-idx3-ubyte': rng.integers(0, 256, (n_train, 28, 28)),
      'train-labels-idx1-ubyte': rng.integers(0, 10, (n_train,)),
      't10k-images-idx3-ubyte': rng.integers(0, 256, (n_test, 28, 28)),
      't10k-labels-idx1-ubyte': rng.integers(0, 10, (n_test,)),
  }
  for name, array in arrays.items():
    write_idx(directory / (name + ('.gz' if gz else '')), array)
  return arrays


def cifar_python_files(name, *, per_batch=4, seed=0):
  """``{filename: pickled bytes}`` of a tiny CIFAR python-version set."""
  rng = np.random.default_rng(seed)
  classes = 10 if name == 'cifar10' else 100
  key = b'labels' if name == 'cifar10' else b'fine_labels'
  names = ([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
           if name == 'cifar10' else ['train', 'test'])
  files = {}
  for n in names:
    data = rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8)
    labels = rng.integers(0, classes, per_batch).tolist()
    files[n] = pickle.dumps({b'data': data, key: labels})
  return files


def make_cifar_python(directory, name='cifar10', **kwargs):
  sub = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
  (directory / sub).mkdir(parents=True, exist_ok=True)
  files = cifar_python_files(name, **kwargs)
  for n, blob in files.items():
    (directory / sub / n).write_bytes(blob)
  return files


def make_cifar_archive(path, name='cifar10', **kwargs):
  sub = 'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'
  with tarfile.open(path, 'w:gz') as tar:
    for n, blob in cifar_python_files(name, **kwargs).items():
      info = tarfile.TarInfo(f'{sub}/{n}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize('gz', [True, False])
def test_mnist_idx(tmp_path, gz):
  arrays = make_mnist(tmp_path / 'mnist', gz=gz)
  for data_dir in (tmp_path, tmp_path / 'mnist'):
    ds = _data.load('mnist', data_dir)
    assert ds.x_train.shape == (12, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0],
                                  arrays['train-images-idx3-ubyte'])
    np.testing.assert_array_equal(ds.y_test, arrays['t10k-labels-idx1-ubyte'])
    assert ds.num_classes == 10


def test_mnist_corrupt_files(tmp_path):
  make_mnist(tmp_path)
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  with gzip.open(path, 'rb') as f:
    data = f.read()
  with gzip.open(path, 'wb') as f:
    f.write(data[:-10])
  with pytest.raises(_data.DataError, match='IDX header says'):
    _data.load('mnist', tmp_path)
  with gzip.open(path, 'wb') as f:
    f.write(b'\x01\x02' + data[2:])
  with pytest.raises(_data.DataError, match='bad magic'):
    _data.load('mnist', tmp_path)
  path.write_bytes(b'not gzip at all')
  with pytest.raises(_data.DataError, match='cannot read'):
    _data.load('mnist', tmp_path)
  (tmp_path / 't10k-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(_data.DataError, match='missing'):
    _data.load('mnist', tmp_path)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_python_version(tmp_path, name):
  files = make_cifar_python(tmp_path, name)
  ds = _data.load(name, tmp_path)
  n_train = 20 if name == 'cifar10' else 4
  assert ds.x_train.shape == (n_train, 32, 32, 3)
  assert ds.x_test.shape == (4, 32, 32, 3)
  assert ds.num_classes == (10 if name == 'cifar10' else 100)
  first = 'data_batch_1' if name == 'cifar10' else 'train'
  raw = pickle.loads(files[first])[b'data']
  # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
  assert ds.x_train[0, 2, 5, 1] == raw[0, 1024 + 2 * 32 + 5]
  assert ds.x_train[1, 31, 0, 2] == raw[1, 2048 + 31 * 32]


def test_cifar_archive_is_extracted(tmp_path):
  make_cifar_archive(tmp_path / 'cifar-10-python.tar.gz')
  ds = _data.load('cifar10', tmp_path)
  assert ds.x_train.shape == (20, 32, 32, 3)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_npz(tmp_path, name):
  rng = np.random.default_rng(0)
  for split, n in (('train', 8), ('test', 5)):
    np.savez(tmp_path / f'{name}_{split}.npz',
             x=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
             y=rng.integers(0, 10, n).astype(np.uint8))
  ds = _data.load(name, tmp_path)
  assert ds.x_train.shape == (8, 32, 32, 3) and ds.y_test.dtype == np.int32


def test_npz_wrong_content(tmp_path):
  np.savez(tmp_path / 'cifar10_train.npz', x=np.zeros((4, 32, 32, 3)),
           y=np.zeros(4))
  np.savez(tmp_path / 'cifar10_test.npz', x=np.zeros((4, 32, 32, 3)),
           y=np.zeros(4))
  with pytest.raises(_data.DataError, match='uint8'):
    _data.load('cifar10', tmp_path)
  (tmp_path / 'cifar10_train.npz').write_bytes(b'garbage')
  with pytest.raises(_data.DataError, match='npz'):
    _data.load('cifar10', tmp_path)


def test_missing_data(tmp_path):
  with pytest.raises(_data.DataError, match='does not exist'):
    _data.load('mnist', tmp_path / 'nowhere')
  with pytest.raises(_data.DataError, match='--download'):
    _data.load('cifar10', tmp_path)
  with pytest.raises(_data.DataError, match='unknown dataset'):
    _data.load('imagenet', tmp_path)


def test_digits_and_subset():
  ds = _data.load('digits')
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.max() == 255
  sub = _data.subset(ds, train=100, test=50)
  assert len(sub.x_train) == 100 and len(sub.x_test) == 50
  assert len(np.unique(sub.y_test)) == 10
  with pytest.raises(_data.DataError, match='larger than'):
    _data.subset(ds, train=10**6)


@pytest.fixture
def http_server(tmp_path):
  """Serves ``tmp_path / 'www'`` on 127.0.0.1; yields (directory, base URL)."""
  root = tmp_path / 'www'
  root.mkdir()
  handler = functools.partial(_QuietHandler, directory=str(root))
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield root, f'http://127.0.0.1:{server.server_address[1]}/'
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    del args


def _md5(path):
  return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_checksum(tmp_path, http_server, monkeypatch):
  www, url = http_server
  make_cifar_archive(www / 'cifar-10-python.tar.gz')
  # The first URL fails (404): the next one is tried.
  good = _data.Resource(
      'cifar-10-python.tar.gz',
      (url + 'missing.tar.gz', url + 'cifar-10-python.tar.gz'),
      _md5(www / 'cifar-10-python.tar.gz'))
  bad = _data.Resource('cifar-10-python.tar.gz',
                       (url + 'cifar-10-python.tar.gz',), '0' * 32)
  cache = tmp_path / 'cache'
  with pytest.raises(_data.DataError, match='checksum mismatch'):
    _data.download_resource(bad, cache, quiet=True)
  assert not list(cache.iterdir())  # Nothing half-written is kept.
  monkeypatch.setitem(_data.RESOURCES, 'cifar10', (good,))
  ds = _data.load('cifar10', download=True, cache_dir=cache, quiet=True)
  assert ds.x_train.shape == (20, 32, 32, 3)
  assert (cache / 'cifar10' / 'cifar-10-python.tar.gz').is_file()
  # Reused from the cache: the server is not needed any more.
  os.remove(www / 'cifar-10-python.tar.gz')
  assert _data.load('cifar10', cache_dir=cache).x_test.shape[0] == 4
  # A cached file that fails its checksum is reported, not used.
  (cache / 'cifar10' / 'cifar-10-python.tar.gz').write_bytes(b'x')
  with pytest.raises(_data.DataError, match='MD5'):
    _data.download_resource(good, cache / 'cifar10', quiet=True)


def test_download_mnist_idx(tmp_path, http_server, monkeypatch):
  www, url = http_server
  make_mnist(www)
  resources = tuple(
      _data.Resource(r.filename, (url + r.filename,), _md5(www / r.filename))
      for r in _data.RESOURCES['mnist'])
  monkeypatch.setitem(_data.RESOURCES, 'mnist', resources)
  ds = _data.load('mnist', tmp_path / 'data', download=True, quiet=True)
  assert ds.x_train.shape == (12, 28, 28, 1)
