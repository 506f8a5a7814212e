"""Gradient accumulation that keeps the statistics of every micro-step."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import statistics


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    inner: the state of the wrapped ``optax.MultiSteps``.
    accumulated_stats: ``{layer path: LayerStats}``, the statistics of the
      micro-steps of the current accumulation, merged exactly.
  """

  inner: optax.MultiStepsState
  accumulated_stats: dict[str, statistics.LayerStats]


def _empty_stats(shape, dtype) -> statistics.LayerStats:
  zero = jnp.zeros([], jnp.float32)
  return statistics.LayerStats(
      mean=jnp.zeros(shape, dtype), variance=jnp.zeros(shape, dtype),
      count=zero, batch_size=zero, positions=zero,
  )


def multi_steps(
    optimizer: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    *,
    layer_specs: layers_lib.LayerSpecs = None,
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
    layer_specs: the ``layer_specs`` given to :func:`scale_by_bnp`, if any.
    **multi_steps_kwargs: other arguments of ``optax.MultiSteps``
      (``use_grad_mean``, ``should_skip_update_fn``).

  Returns:
    A transformation whose ``update`` takes ``layer_stats=`` every
    micro-step.

  Example:
    >>> import bnp_optax
    >>> tx = bnp_optax.multi_steps(bnp_optax.bnp(0.1), every_k_schedule=4)

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Algorithm 2, whose batch statistics are those of the whole batch).
  """
  accumulator = optax.MultiSteps(
      optimizer, every_k_schedule, **multi_steps_kwargs
  )

  def init_fn(params):
    tree = layers_lib.parse_tree(params, layer_specs)
    stats = {}
    for name, layer in tree.layers.items():
      dtype = statistics.statistics_dtype(tree.leaves[layer.kernel_index].dtype)
      stats[name] = _empty_stats(
          layer.spec.statistics_shape(layer.kernel_shape), dtype)
    return MultiStepsState(accumulator.init(params), stats)

  def update_fn(updates, state, params=None, *, layer_stats=None,
                **extra_args):
    if layer_stats is None:
      raise ValueError(
          'multi_steps: update() needs the keyword argument layer_stats, the '
          'statistics of this micro-step.'
      )
    current = layers_lib.flatten_layer_stats(layer_stats)
    merged = {}
    for name, stats in current.items():
      if name in state.accumulated_stats:
        stored = state.accumulated_stats[name]
        stats = statistics.merge_statistics([
            stored.replace(mean=stored.mean.astype(stats.mean.dtype),
                           variance=stored.variance.astype(stats.mean.dtype)),
            stats,
        ])
      merged[name] = stats
    new_updates, inner = accumulator.update(
        updates, state.inner, params, layer_stats=merged, **extra_args
    )
    emitted = inner.gradient_step != state.inner.gradient_step
    skipped = (inner.mini_step == state.inner.mini_step) & ~emitted
    accumulated = {}
    for name, stored in state.accumulated_stats.items():
      new = merged.get(name, stored).replace(spec=None)
      accumulated[name] = jax.tree.map(
          lambda old, new: jnp.where(
              emitted, jnp.zeros_like(old),
              jnp.where(skipped, old, new.astype(old.dtype))),
          stored, new)
    return new_updates, MultiStepsState(inner, accumulated)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
