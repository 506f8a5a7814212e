"""Orbax checkpoints of a run, so that an interrupted run can resume.

A checkpoint is saved at each evaluation (the last one kept): the training
state and, as JSON, what the loop needs to continue: the step, the history,
the timing and the Figure 8 rows.
"""

import pathlib

import jax

from bnp_optax.experiments import _deps
from bnp_optax.experiments import _manifest


class Checkpoints:
  """Orbax checkpoints of one run, one per evaluation (the last one kept).

  Each save writes a manifest (``_manifest``: the run's identity, file
  sizes and digests) that a restore probes first, so that a damaged or
  foreign checkpoint is an error naming it.
  """

  def __init__(self, directory, identity=None):
    """Checkpoints in ``directory`` of the run of ``identity``.

    Args:
      directory: the run's checkpoint directory.
      identity: the run's identity (``_config.canonical``), stored in the
        manifest and checked on restore.
    """
    self.identity = identity
    try:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise _deps.MissingDependency('orbax-checkpoint', 'checkpointing') from e
    self.ocp = ocp
    # Orbax wants absolute paths.
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False,
            create=True))

  def latest(self):
    """The step of the last checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, step, state, meta):
    """Saves the pytree ``state`` and the JSON object ``meta`` at ``step``."""
    ocp = self.ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    _manifest.write(self.directory, step, self.identity)

  def restore(self, step, like):
    """``(state, meta)`` of ``step``, ``state`` shaped as ``like``.

    Raises:
      _manifest.CheckpointError: the checkpoint is damaged, of another run,
        or cannot be restored.
    """
    ocp = self.ocp
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    _manifest.probe(self.directory, self.identity)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types; all mean the same here.
      raise _manifest.CheckpointError(
          f'the checkpoint at step {step} in {self.directory} cannot be '
          f'restored ({type(e).__name__}: {str(e)[:200]})') from e
    return restored['state'], restored['meta']

  def close(self):
    self.manager.close()
