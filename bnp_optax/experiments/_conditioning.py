"""Figure 8: condition numbers of the output neuron's Hessian during training.

At every ``conditioning_every``-th step of a BNP run on a fully connected
model (``_models.Model.conditioning``), the Hessian of the loss with respect
to the first output neuron's weights is taken on the step's batch, and its
condition number is compared with the BNP-preconditioned one (Section 5.1).
"""

import jax
import jax.numpy as jnp
import optax

from bnp_optax import diagnostics
from bnp_optax.experiments import _models
from bnp_optax.experiments import _results


class Conditioning:
  """The condition numbers of one run, one row per measured step.

  Attributes:
    rows: ``[{step, loss, kappa_hessian, kappa_preconditioned, ...}]``, the
      result's ``conditioning``.
  """

  def __init__(self, model, config):
    """Measures ``model`` trained by ``config`` (nothing if it says not to).

    Args:
      model: the linen module; with ``config.conditioning_every``, a fully
        connected one whose ``hidden`` attribute lists its hidden layers.
      config: the run's ``RunConfig``.
    """
    self.model = model
    self.config = config
    self.every = config.conditioning_every
    self.layer = f'Dense_{len(model.hidden)}' if self.every else None
    self.rows = []

  def before(self, step: int, state, x, y):
    """The output neuron's Hessian on the batch, before ``step``.

    Returns None for a step that is not measured.

    Args:
      step: the step about to be taken.
      state: the run's ``(params, model state, optimizer state, key)``.
      x: the batch's uint8 images, scaled to ``[0, 1]`` here as the
        training step scales them.
      y: its labels.
    """
    if not self.every or step % self.every:
      return None
    params, model_state, _, _ = state
    return diagnostics.neuron_hessian(
        self.model, {'params': params, **model_state},
        x.astype(jnp.float32) / 255.0,
        jax.tree_util.Partial(_models.cross_entropy, labels=jnp.asarray(y)),
        layer=self.layer, neuron=0)

  def after(self, step, loss, nh, state):
    """Adds the row of ``step``: ``nh`` from :meth:`before`, ``state`` after.

    Does nothing when ``nh`` is None (a step not measured).
    """
    if nh is None:
      return
    config = self.config
    running = optax.tree_utils.tree_get(
        state[2], 'ScaleByBNPState').running_stats[self.layer]
    # The P applied to this step's gradient: the running statistics after
    # this step's update (Algorithm 2, steps 2-3).
    c = diagnostics.conditioning(nh.hessian, running, eps1=config.eps1,
                                 eps2=config.eps2)
    # The theory's P with this batch's own statistics (Theorem 3).
    batch = diagnostics.conditioning(
        nh.hessian, diagnostics.patch_statistics(nh.inputs),
        eps1=config.eps1, eps2=config.eps2)
    # Without the regularisers (eps1 = eps2 = 0), as in Eq. 12.
    plain = diagnostics.conditioning(nh.hessian, running, eps1=0.0, eps2=0.0)
    self.rows.append(dict(
        step=step, loss=_results.finite_or_none(loss),
        kappa_hessian=c.kappa_hessian,
        kappa_preconditioned=c.kappa_preconditioned, kappa_d=c.kappa_d,
        kappa_preconditioned_batch=batch.kappa_preconditioned, rank=c.rank,
        kappa_preconditioned_eps0=plain.kappa_preconditioned,
        kappa_d_eps0=plain.kappa_d, size=int(nh.hessian.shape[0])))
