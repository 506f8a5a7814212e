"""Multi-host training, for real: 2 processes x 4 CPU devices vs 1 x 8.

Two processes join a ``jax.distributed`` cluster on localhost (gloo CPU
collectives) and train BNP on a global batch sharded over all 8 devices,
with ``jit`` and with ``shard_map`` + ``axis_name``; one process holding 8
devices does the same. Parameters and BNP state agree to float32 rounding,
and an orbax checkpoint written by the two processes restores in one.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytest.importorskip('orbax.checkpoint')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _workers(out, num_processes, devices_each, mode):
  env = {k: v for k, v in os.environ.items() if not k.startswith('XLA_')}
  env.update(
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_each}',
      JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  port = str(_free_port())
  procs = [
      subprocess.Popen(
          [sys.executable, '-m', 'tests.multihost_worker', str(out), str(i),
           str(num_processes), port, mode],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for i in range(num_processes)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-4000:]
    assert f'8 devices, {devices_each} local, done' in output, output
  return np.load(out / f'{mode}-{num_processes}.npz')


def test_two_processes_equal_one_process_and_checkpoint_restores(tmp_path):
  two = _workers(tmp_path, 2, 4, 'save')
  one = _workers(tmp_path, 1, 8, 'restore')
  jit_keys = [k for k in two.files if k.startswith('jit')]
  assert any('running_stats' in k for k in jit_keys), jit_keys
  for key in two.files:
    np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=1e-6,
                               err_msg=key)
  for key in jit_keys:
    # What 1 process restored from the 2 processes' checkpoint is exact.
    np.testing.assert_array_equal(
        one['restored' + key[len('jit'):]], two[key], err_msg=key)
    # jit on the sharded batch and shard_map with axis_name agree.
    np.testing.assert_allclose(
        two['shard_map' + key[len('jit'):]], two[key], rtol=2e-5,
        atol=1e-6, err_msg=key)
