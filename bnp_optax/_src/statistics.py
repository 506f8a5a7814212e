"""Statistics of a layer's inputs, as collected in the forward pass.

This module is framework-free: it knows arrays, not Flax modules. The Flax
integrations call :func:`input_statistics` on the input of every Dense and
Conv layer, and :func:`merge_statistics` when a layer is applied more than
once in one forward pass.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class LayerStats(NamedTuple):
  """Statistics of one layer's inputs over one forward pass.

  The mean and the biased (``1/count``) variance are taken per input feature
  (Dense) or per input channel (Conv, over the batch and every spatial
  position, the paper's Eqs. 21-22). The three scalars say how much data they
  summarise; they are stored as float arrays so that they can be summed and
  averaged across devices and repeated calls.

  Attributes:
    mean: per-feature mean, shape ``(n_in,)`` (or the fan-in shape).
    variance: per-feature biased variance, same shape as ``mean``.
    count: number of values averaged per feature: ``N`` for a Dense layer,
      ``N * r_in * s_in`` for a Conv layer.
    batch_size: ``N``, the number of rows of the layer's input matrix (the
      product of every leading axis for a Dense layer applied to ``(B, T, n)``
      inputs; the batch axes for a Conv layer). Used for ``q``.
    positions: number of output spatial positions per example, ``r * s`` for
      a 2-D convolution (the positions at which the kernel is applied, so the
      output size for strided or VALID convolutions), ``1`` for Dense. Used
      for ``q``.
  """

  mean: jax.Array
  variance: jax.Array
  count: jax.Array
  batch_size: jax.Array
  positions: jax.Array


def statistics_dtype(dtype) -> jnp.dtype:
  """Reductions are done in float32 at least, float64 when inputs are."""
  return jnp.promote_types(dtype, jnp.float32)


def input_statistics(
    inputs: jax.Array,
    *,
    num_batch_axes: int,
    positions: int,
) -> LayerStats:
  """Mean and biased variance of ``inputs`` over all axes but the last.

  The reduction is one pass over the data, shifted by the first row so that a
  large mean with a small spread keeps its variance (the naive
  ``E[x^2] - E[x]^2`` loses it in float32); the variance is clipped at zero.
  No gradient flows through the statistics.

  Args:
    inputs: the layer input, features (or channels) on the last axis.
    num_batch_axes: how many leading axes are batch axes; the remaining
      middle axes are spatial.
    positions: output spatial positions per example (1 for Dense).

  Returns:
    The :class:`LayerStats` of ``inputs``.
  """
  dtype = statistics_dtype(inputs.dtype)
  x = lax.stop_gradient(inputs).astype(dtype)
  num_features = x.shape[-1]
  rows = x.reshape(-1, num_features)
  count = rows.shape[0]
  if count == 0:
    raise ValueError('cannot take statistics of an empty batch')
  shift = rows[0]
  centred = rows - shift[None, :]
  mean_centred = jnp.mean(centred, axis=0)
  mean_square_centred = jnp.mean(jnp.square(centred), axis=0)
  variance = jnp.maximum(mean_square_centred - jnp.square(mean_centred), 0)
  batch_size = 1
  for size in x.shape[:num_batch_axes]:
    batch_size *= size
  scalar = lambda v: jnp.asarray(v, jnp.float32)
  return LayerStats(
      mean=shift + mean_centred,
      variance=variance,
      count=scalar(count),
      batch_size=scalar(batch_size),
      positions=scalar(positions),
  )


def merge_statistics(stats: Sequence[LayerStats]) -> LayerStats:
  """Combines the statistics of several calls of one layer exactly.

  Means are weighted by counts and variances combined by the law of total
  variance (within-call variance plus the spread of the call means), so the
  result equals the statistics of all the calls' inputs taken together.
  Batch sizes add up (every call contributes rows to the layer's Hessian);
  positions are averaged, weighted by batch size.

  Args:
    stats: the statistics of each call, all with the same shapes.

  Returns:
    One :class:`LayerStats` for all the calls.
  """
  stats = list(stats)
  if len(stats) == 1:
    return stats[0]
  total = sum(s.count for s in stats)
  mean = sum(s.count * s.mean for s in stats) / total
  variance = sum(
      s.count * (s.variance + jnp.square(s.mean - mean)) for s in stats
  ) / total
  batch_size = sum(s.batch_size for s in stats)
  positions = sum(s.batch_size * s.positions for s in stats) / batch_size
  return LayerStats(mean, variance, total, batch_size, positions)
