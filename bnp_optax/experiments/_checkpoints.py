"""Orbax checkpoints of a run, so that an interrupted run can resume.

A checkpoint is saved at each evaluation (the last one kept): the training
state and, as JSON, what the loop needs to continue: the step, the history,
the timing and the Figure 8 rows.
"""

import pathlib

import jax

from bnp_optax.experiments import _deps


class Checkpoints:
  """Orbax checkpoints of one run, one per evaluation (the last one kept)."""

  def __init__(self, directory):
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

  def restore(self, step, like):
    """``(state, meta)`` of ``step``, ``state`` shaped as ``like``."""
    ocp = self.ocp
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def close(self):
    self.manager.close()
