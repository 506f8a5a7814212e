"""One process of the multi-host test (tests/test_multihost.py).

Run as ``python -m tests.multihost_worker OUT PROCESS_ID NUM_PROCESSES PORT``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=D``. With more than
one process it joins a ``jax.distributed`` cluster on localhost with gloo CPU
collectives; the global mesh spans every process's devices either way. It
trains a few BNP steps on a global batch sharded over the mesh, once with
``jax.jit`` (statistics of the sharded batch, no collective of ours) and once
inside ``shard_map`` (per-device statistics combined with ``axis_name``),
writes the results from process 0, and saves (or, with ``restore``,
restores) an orbax checkpoint of the jit run.
"""

import pathlib
import sys

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import bnp_optax
import bnp_optax.linen
from tests import models

STEPS, BATCH = 3, 32


def _global_batches(mesh):
  rng = np.random.default_rng(0)  # the same global data in every process
  sharding = NamedSharding(mesh, P('data'))
  batches = []
  for _ in range(STEPS):
    x = models.badly_scaled_inputs(rng, (BATCH, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=BATCH)
    batches.append(tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
        for a in (x, y)))
  return batches


def _loss(model, params, x, y, axis_name=None):
  out, stats = bnp_optax.linen.apply(
      model, {'params': params}, x, axis_name=axis_name)
  loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  return loss, stats


def main():
  out, process_id, num_processes, port = sys.argv[1:5]
  mode = sys.argv[5] if len(sys.argv) > 5 else 'save'
  process_id, num_processes = int(process_id), int(num_processes)
  if num_processes > 1:
    # Before any computation: no backend may start before the cluster is up.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'localhost:{port}', num_processes=num_processes,
        process_id=process_id, initialization_timeout=120)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  model = models.MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))['params']
  params = jax.device_put(params, replicated)
  tx = bnp_optax.bnp(0.1, momentum=0.9)
  batches = _global_batches(mesh)

  @jax.jit
  def jit_step(params, state, x, y):
    (_, stats), grads = jax.value_and_grad(
        lambda p: _loss(model, p, x, y), has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
                 out_specs=(P(), P()))
  def shard_map_step(params, state, x, y):
    def global_loss(p):
      # The mean over devices is the global batch's loss; its gradient with
      # respect to the replicated parameters is then the global gradient.
      loss, stats = _loss(model, p, x, y, axis_name='data')
      return jax.lax.pmean(loss, 'data'), stats

    (_, stats), grads = jax.value_and_grad(global_loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state

  results = {}
  for name, step in (('jit', jit_step), ('shard_map', shard_map_step)):
    p, state = params, jax.device_put(tx.init(params), replicated)
    for x, y in batches:
      p, state = step(p, state, x, y)
    results[name] = (p, state)

  import orbax.checkpoint as ocp
  checkpoint = pathlib.Path(out) / 'checkpoint'
  with ocp.StandardCheckpointer() as checkpointer:
    if mode == 'save':
      checkpointer.save(checkpoint, results['jit'])
      checkpointer.wait_until_finished()
    else:
      target = jax.tree.map(jnp.zeros_like, results['jit'])
      results['restored'] = checkpointer.restore(checkpoint, target)

  flat = {}
  for name, tree in results.items():
    host = multihost_utils.process_allgather(tree, tiled=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
      flat[f'{name}{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  if process_id == 0:
    np.savez(pathlib.Path(out) / f'{mode}-{num_processes}.npz', **flat)
  print(f'process {process_id}: {len(jax.devices())} devices, '
        f'{len(jax.local_devices())} local, done')


if __name__ == '__main__':
  main()
