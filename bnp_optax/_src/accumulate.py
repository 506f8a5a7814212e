"""Gradient accumulation that keeps the statistics of every micro-step."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import statistics
from bnp_optax._src import transform


class AccumulatedStats(NamedTuple):
  """One layer's statistics merged over the micro-steps so far.

  The fields of :class:`~bnp_optax.LayerStats` less its static layout, as a
  ``NamedTuple`` so that the state serialises with ``flax.serialization``
  and orbax like any optax state. An empty accumulator has ``count == 0``.
  """

  mean: jax.Array
  mean_residual: jax.Array
  variance: jax.Array
  count: jax.Array
  batch_size: jax.Array
  positions: jax.Array

  @classmethod
  def empty(cls, shape, dtype) -> 'AccumulatedStats':
    zeros = jnp.zeros(shape, dtype)
    zero = jnp.zeros([], jnp.float32)
    return cls(zeros, zeros, zeros, zero, zero, zero)

  @classmethod
  def of(cls, stats: statistics.LayerStats, dtype) -> 'AccumulatedStats':
    residual = stats.mean_residual
    if residual is None:
      residual = jnp.zeros_like(stats.mean)
    return cls(
        stats.mean.astype(dtype), residual.astype(dtype),
        stats.variance.astype(dtype), stats.count, stats.batch_size,
        stats.positions,
    )

  def as_layer_stats(self, dtype) -> statistics.LayerStats:
    return statistics.LayerStats(
        mean=self.mean.astype(dtype), variance=self.variance.astype(dtype),
        count=self.count, batch_size=self.batch_size,
        positions=self.positions,
        mean_residual=self.mean_residual.astype(dtype),
    )


class BNPMultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Not ``optax.MultiStepsState`` (which is the ``inner`` field here): the
  step counters are ``state.inner.mini_step`` and
  ``state.inner.gradient_step``.

  Attributes:
    inner: the state of the wrapped ``optax.MultiSteps``.
    accumulated_stats: ``{layer path: AccumulatedStats}``, the statistics
      of the micro-steps of the current accumulation, merged exactly.
  """

  inner: optax.MultiStepsState
  accumulated_stats: dict[str, AccumulatedStats]


def _running_stats_of(inner_state: Any) -> dict[str, transform.RunningStats]:
  """The running statistics of every ``scale_by_bnp`` in ``inner_state``."""
  is_bnp = lambda x: isinstance(x, transform.ScaleByBNPState)
  found = {}
  for node in jax.tree.leaves(inner_state, is_leaf=is_bnp):
    if is_bnp(node) and isinstance(node.running_stats, dict):
      found.update(node.running_stats)
  return found


class MultiStepsTransformation(optax.GradientTransformationExtraArgs):
  """What :func:`multi_steps` returns: a transformation with ``has_updated``."""

  def has_updated(self, state: BNPMultiStepsState) -> jax.Array:
    """Whether the last ``update`` applied the optimizer (as optax's)."""
    return jnp.logical_and(
        state.inner.mini_step == 0, state.inner.gradient_step > 0)


def multi_steps(
    optimizer: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` for BNP: accumulates statistics with gradients.

  ``optax.MultiSteps`` averages the gradients of ``k`` micro-steps and calls
  the optimizer once, with the extra arguments of the last micro-step only:
  BNP would see a ``k``-th of the data. This wrapper merges the statistics of
  every micro-step exactly (counts-weighted means, law of total variance,
  batch sizes summed) and gives the merged statistics to the optimizer, so
  ``k`` micro-batches of ``N`` give the same step as one batch of ``k N``.

  Args:
    optimizer: the optimizer, containing :func:`scale_by_bnp`.
    every_k_schedule: as for ``optax.MultiSteps``.
    **multi_steps_kwargs: other arguments of ``optax.MultiSteps``
      (``use_grad_mean``, ``should_skip_update_fn``).

  Returns:
    A transformation whose ``update`` takes ``layer_stats=`` every
    micro-step, with ``has_updated(state)`` as ``optax.MultiSteps`` has.

  Example:
    >>> import bnp_optax
    >>> import jax.numpy as jnp
    >>> tx = bnp_optax.multi_steps(bnp_optax.bnp(0.1), every_k_schedule=4)
    >>> state = tx.init({'Dense_0': {'kernel': jnp.zeros((3, 2))}})
    >>> bool(tx.has_updated(state))
    False

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Algorithm 2, whose batch statistics are those of the whole batch).
  """
  # The accumulator is sized from the inner optimizer's running statistics.
  accumulator = optax.MultiSteps(
      optimizer, every_k_schedule, **multi_steps_kwargs
  )

  def init_fn(params):
    inner = accumulator.init(params)
    if transform.is_params_placeholder(params):
      return BNPMultiStepsState(inner, transform.NOT_PARAMETERS)
    stats = {
        name: AccumulatedStats.empty(running.mean.shape, running.mean.dtype)
        for name, running in _running_stats_of(inner).items()
    }
    return BNPMultiStepsState(inner, stats)

  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    if layer_stats is None:
      raise ValueError(
          'multi_steps: update() needs the keyword argument layer_stats, the '
          'statistics of this micro-step (from bnp_optax.linen.apply or '
          'bnp_optax.nnx.apply).'
      )
    current = layers_lib.flatten_layer_stats(layer_stats)
    merged = {}
    for name, stats in current.items():
      if name in state.accumulated_stats:
        stored = state.accumulated_stats[name]
        stats = statistics.merge_statistics(
            [stored.as_layer_stats(stats.mean.dtype), stats])
      merged[name] = stats
    notes = {
        name: layers_lib.NotPreconditioned(reason) for name, reason in
        layers_lib.not_preconditioned(layer_stats).items()}
    new_updates, inner = accumulator.update(
        updates, state.inner, params, layer_stats={**merged, **notes},
        **extra_args
    )
    emitted = inner.gradient_step != state.inner.gradient_step
    skipped = (inner.mini_step == state.inner.mini_step) & ~emitted
    accumulated = {}
    for name, stored in state.accumulated_stats.items():
      new = (AccumulatedStats.of(merged[name], stored.mean.dtype)
             if name in merged else stored)
      accumulated[name] = jax.tree.map(
          lambda old, new: jnp.where(
              emitted, jnp.zeros_like(old), jnp.where(skipped, old, new)),
          stored, new)
    return new_updates, BNPMultiStepsState(inner, accumulated)

  return MultiStepsTransformation(init_fn, update_fn)
