"""Statistics of a layer's inputs, as collected in the forward pass.

This module is framework-free: it knows arrays, not Flax modules. The Flax
integrations call :func:`input_statistics` on the input of every Dense and
Conv layer, :func:`merge_statistics` when a layer is applied more than once in
one forward pass, and :func:`all_reduce_statistics` to combine devices.
"""

from collections.abc import Sequence
import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp

from bnp_optax._src.layout import LayerSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Statistics of one layer's inputs over one forward pass.

  The mean and the biased (``1/count``) variance are taken per input feature
  (Dense) or per input channel (Conv, over the batch and every spatial
  position, the paper's Eqs. 21-22). The three scalars say how much data they
  summarise; they are float arrays so that they can be summed and averaged
  across devices and repeated calls. ``spec``, static, is the layout of the
  layer's kernel as the integration that measured it knows it.

  Attributes:
    mean: per-feature mean, shape ``(n_in,)`` (in general the independent
      and fan-in shape of the kernel, see :class:`LayerSpec`).
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
    spec: the kernel layout, or ``None`` to let the optimizer infer it.
    mean_residual: what ``mean`` lost to rounding (the mean is
      ``mean + mean_residual``), or ``None`` for zero. Only merging needs it:
      a float32 mean 1e6 times the spread is rounded by a good part of the
      spread, which would bias the spread of the means that
      :func:`merge_statistics` and :func:`all_reduce_statistics` add.
  """

  mean: jax.Array
  variance: jax.Array
  count: jax.Array
  batch_size: jax.Array
  positions: jax.Array
  spec: LayerSpec | None = dataclasses.field(
      default=None, metadata=dict(static=True)
  )
  mean_residual: jax.Array | None = None

  def replace(self, **changes) -> 'LayerStats':
    return dataclasses.replace(self, **changes)

  def deviation_from(self, reference: jax.Array) -> jax.Array:
    """``mean - reference``, the residual included, exactly where close."""
    deviation = self.mean - reference
    if self.mean_residual is None:
      return deviation
    return deviation + self.mean_residual


def statistics_dtype(dtype) -> jnp.dtype:
  """Reductions are done in float32 at least, float64 when inputs are.

  Canonical, as optax creates its state: NumPy float64 parameters or inputs
  with x64 off give float32, without a warning.
  """
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


# Up to this many rows, XLA:CPU sums columns faster as a GEMV (below)...
_CPU_GEMV_MAX_ROWS = 128
# ... when there are at least this many columns. XLA:CPU compiles every
# matrix-vector product separately (an LLVM kernel each, never shared
# between layers of the same shape, where identical fusions are), so a
# GEMV per layer made the compile time grow with depth.
_CPU_GEMV_MIN_COLUMNS = 256


def _column_sums(rows: jax.Array) -> jax.Array:
  """``rows.sum(0)``; on CPU, for few wide rows, as a matrix-vector product.

  XLA:CPU runs the column reduction of a short, wide ``(rows, features)``
  matrix several times slower than the library GEMV ``1^T rows``, but
  compiles every GEMV on its own, one per layer, where the identical
  reductions of same-shape layers share one kernel: narrow inputs (fewer
  than ``_CPU_GEMV_MIN_COLUMNS`` features) are reduced, so that a deep
  network's compile time does not grow with a GEMV per layer. With more
  rows the GEMV loses: its operand must be materialised (the squared
  deviations, a temporary the size of the layer input), where the reduction
  fuses with its producer (the timings are in ``benchmarks/RESULTS.md``,
  "Timings behind the library's choices"). Other platforms always reduce.
  ``HIGHEST`` keeps the sums in full float32.
  """
  if (rows.shape[0] > _CPU_GEMV_MAX_ROWS
      or rows.shape[1] < _CPU_GEMV_MIN_COLUMNS):
    return jnp.sum(rows, axis=0)

  def as_product(rows):
    ones = jnp.ones(rows.shape[:1], rows.dtype)
    return jnp.dot(ones, rows, precision=lax.Precision.HIGHEST)

  return lax.platform_dependent(
      rows, cpu=as_product, default=lambda rows: jnp.sum(rows, axis=0)
  )


def _data_shift(rows: jax.Array) -> jax.Array:
  """One data value per column: the first row, or the column maximum.

  The first row is free, but a batch sharded with explicit axis types
  (``jax.make_mesh``'s default) cannot be sliced across its sharded axis;
  there the column maximum, one more reduction, is used instead. Both are
  stored values, so every fusion that subtracts them subtracts the same
  numbers.
  """
  if _sharded_across_rows(rows):
    return jnp.max(rows, axis=0)
  return rows[0]


def _sharded_across_rows(rows: jax.Array) -> bool:
  """Whether ``rows`` has an explicit sharding that splits its rows."""
  typeof = getattr(jax, 'typeof', None)
  spec = getattr(getattr(typeof(rows), 'sharding', None), 'spec', None) if (
      typeof) else None
  return bool(spec) and spec[0] is not None


def _shifted_two_pass(
    rows: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Column means and biased variances of ``rows``, accurate in float32.

  The plain two-pass variance ``mean((x - m)^2)`` is off by ``(m - mu)^2``,
  ``m`` the float mean and ``mu`` the true one; for a mean 1e6 times the
  spread that is percents, since float32 cannot even hold the mean closer
  than a few hundredths of the spread. As in the corrected two-pass
  algorithm (Chan, Golub and LeVeque, 1983), the error is measured and
  removed, with two passes, as the plain algorithm takes:

  1. ``D = sum(x - x_0)``, deviations from a data value ``x_0`` (see
     :func:`_data_shift`: within a few spreads of the mean, and read, not
     computed, wherever it is used);
  2. ``Q = sum((x - s)^2)`` about the refined shift ``s = x_0 + D 2^-k``,
     ``2^k`` the power of two nearest the row count, so that the shift is
     exact arithmetic on stored values and every fusion XLA makes computes
     the same ``s`` (a ``D / count`` would be contracted into fused
     multiply-adds in some places and not in others);
  3. the offset ``o = mu - s = (x_0 - s) + D / count``, the variance
     ``Q / count - o^2``, and the mean as the float ``s + o`` with the
     residual that float rounding dropped.

  The second pass depends on the first, so XLA:CPU does not fuse them into
  one multi-output reduction, which it runs an order of magnitude slower.
  On CPU, a tall input with few columns is summed folded (see
  :func:`_fold_factor`).

  Returns:
    The means, their residuals (see ``LayerStats.mean_residual``) and the
    variances.
  """
  fold = _fold_factor(rows)
  if fold == 1:
    return _shifted_two_pass_folded(rows, 1)
  return lax.platform_dependent(
      rows, cpu=lambda rows: _shifted_two_pass_folded(rows, fold),
      default=lambda rows: _shifted_two_pass_folded(rows, 1))


# XLA:CPU reduces a tall matrix fastest with about this many columns.
_CPU_FOLDED_COLUMNS = 96


def _fold_factor(rows: jax.Array) -> int:
  """How many rows :func:`_shifted_two_pass` sums side by side on CPU.

  XLA:CPU sums the columns of a tall matrix with short rows at a fraction of
  memory bandwidth; seen as ``(rows / k, k * columns)`` (a free reshape),
  with the ``k`` partial sums of each column added afterwards, it sums them
  several times faster up to about 96 columns, while 64 columns folded in
  two were slower, so they are not folded (the timings are in
  ``benchmarks/RESULTS.md``, "Timings behind the library's choices"). Only
  the order of the additions differs. The factor is the largest power of two
  ``k`` that divides the rows, keeps ``k * columns <= 96`` and leaves more than
  ``_CPU_GEMV_MAX_ROWS`` rows; ``1`` for a batch sharded across its rows,
  which a reshape could move between devices.
  """
  count, columns = rows.shape
  if _sharded_across_rows(rows):
    return 1
  k = 1
  while (2 * k * columns <= _CPU_FOLDED_COLUMNS and count % (2 * k) == 0
         and count // (2 * k) > _CPU_GEMV_MAX_ROWS):
    k *= 2
  return k


def _shifted_two_pass_folded(
    rows: jax.Array, fold: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`_shifted_two_pass` with ``fold`` rows summed side by side.

  The shifts are subtracted from the folded matrix (tiled ``fold`` times, the
  same stored values), not before folding: XLA:CPU would run the subtraction
  in the narrow shape and lose the gain.
  """
  count, columns = rows.shape
  shift = _data_shift(rows)
  folded = rows.reshape(count // fold, fold * columns)

  def sums(block_sums):
    return jnp.sum(block_sums.reshape(fold, columns), axis=0)

  deviation_sum = sums(_column_sums(folded - jnp.tile(shift, fold)[None, :]))
  refined = shift + deviation_sum * (2.0 ** -round(math.log2(count)))
  square_sum = sums(_column_sums(
      jnp.square(folded - jnp.tile(refined, fold)[None, :])))
  offset = (shift - refined) + deviation_sum / count
  variance = jnp.maximum(square_sum / count - jnp.square(offset), 0)
  mean = refined + offset
  residual = (refined - mean) + offset
  return mean, residual, variance


def input_statistics(
    inputs: jax.Array,
    *,
    feature_axes: Sequence[int] = (-1,),
    batch_axes: Sequence[int] | None = None,
    positions: int = 1,
    spec: LayerSpec | None = None,
) -> LayerStats:
  """Mean and biased variance of ``inputs`` over all but the feature axes.

  The corrected two-pass algorithm (:func:`_shifted_two_pass`), so that a
  large mean with a small spread keeps its variance in float32 (the one-pass
  ``E[x^2] - E[x]^2`` loses it entirely, the plain two-pass by a few percent
  at a mean 1e6 times the spread) and no slice of the batch is needed (a
  batch sharded across devices is reduced as one). No gradient flows through
  the statistics.

  Args:
    inputs: the layer input.
    feature_axes: the axes kept, in the order of the statistics' shape (the
      last axis for Dense and Conv inputs).
    batch_axes: the axes whose product is the batch size ``N``; ``None``
      means every reduced axis (right for Dense layers).
    positions: output spatial positions per example (1 for Dense).
    spec: the layer's kernel layout, recorded in the result.

  Returns:
    The :class:`LayerStats` of ``inputs``.

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> x = jnp.array([[1., 10.], [3., 10.]])
    >>> stats = bnp_optax.input_statistics(x)
    >>> print(stats.mean, stats.variance, stats.batch_size)
    [ 2. 10.] [1. 0.] 2.0

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Eq. 13 for Dense layers, Eqs. 21-22 for convolutions).
  """
  dtype = statistics_dtype(inputs.dtype)
  x = lax.stop_gradient(inputs).astype(dtype)
  ndim = x.ndim
  kept = [a % ndim for a in feature_axes]
  reduced = [a for a in range(ndim) if a not in kept]
  x = jnp.transpose(x, reduced + kept)
  feature_shape = x.shape[len(reduced):]
  rows = x.reshape(-1, math.prod(feature_shape))
  count = rows.shape[0]
  if count == 0:
    raise ValueError('cannot take statistics of an empty batch')
  mean, mean_residual, variance = _shifted_two_pass(rows)
  if batch_axes is None:
    batch_size = count
  else:
    batch_size = math.prod(inputs.shape[a] for a in batch_axes)
  scalar = lambda v: jnp.asarray(v, jnp.float32)
  return LayerStats(
      mean=mean.reshape(feature_shape),
      variance=variance.reshape(feature_shape),
      count=scalar(count),
      batch_size=scalar(batch_size),
      positions=scalar(positions),
      spec=spec,
      mean_residual=mean_residual.reshape(feature_shape),
  )


def _common_spec(stats: Sequence[LayerStats]) -> LayerSpec | None:
  specs = {s.spec for s in stats if s.spec is not None}
  if len(specs) > 1:
    raise ValueError(f'cannot merge statistics of different layouts {specs}')
  return specs.pop() if specs else None


def _combine_about(reference, total, deviation_sum, square_sum):
  """The corrected two-pass rule about ``reference``.

  From the count-weighted sums of deviations from ``reference`` (``sum d``
  and ``sum d^2``, or for merged statistics ``sum c (m - ref)`` and
  ``sum c (v + (m - ref)^2)``): the mean ``ref + shift`` as a rounded value
  and its residual, and the variance ``sum d^2 / total - shift^2``.
  """
  safe_total = jnp.maximum(total, 1)
  shift = deviation_sum / safe_total
  variance = jnp.maximum(square_sum / safe_total - jnp.square(shift), 0)
  mean = reference + shift
  # Exact when mean and reference are close (Sterbenz): what rounding lost.
  residual = (reference - mean) + shift
  return mean, residual, variance


def merge_statistics(stats: Sequence[LayerStats]) -> LayerStats:
  """Combines the statistics of several calls of one layer exactly.

  Means are weighted by counts and variances combined by the law of total
  variance (within-call variance plus the spread of the call means), so the
  result equals the statistics of all the calls' inputs taken together.
  Batch sizes add up (every call contributes rows to the layer's Hessian);
  positions are averaged, weighted by batch size. Statistics with a zero
  count (an empty accumulator) contribute nothing.

  Args:
    stats: the statistics of each call, all with the same shapes.

  Returns:
    One :class:`LayerStats` for all the calls.

  Example:
    >>> import jax.numpy as jnp
    >>> import bnp_optax
    >>> a = bnp_optax.input_statistics(jnp.array([[0.], [2.]]))
    >>> b = bnp_optax.input_statistics(jnp.array([[4.], [6.], [8.]]))
    >>> merged = bnp_optax.merge_statistics([a, b])
    >>> print(merged.mean, merged.variance, merged.batch_size)
    [4.] [8.] 5.0
  """
  stats = list(stats)
  spec = _common_spec(stats)
  if len(stats) == 1:
    return stats[0].replace(spec=spec)
  zero_residual = lambda s: (s.mean_residual if s.mean_residual is not None
                             else jnp.zeros_like(s.mean))
  stack = lambda field: jnp.stack([field(s) for s in stats])
  return merge_stacked(LayerStats(
      mean=stack(lambda s: s.mean),
      variance=stack(lambda s: s.variance),
      count=stack(lambda s: s.count),
      batch_size=stack(lambda s: s.batch_size),
      positions=stack(lambda s: s.positions),
      spec=spec,
      mean_residual=stack(zero_residual),
  ))


def merge_stacked(stats: LayerStats) -> LayerStats:
  """Merges statistics stacked along leading axes, one entry per call.

  The law of :func:`merge_statistics` (the one merge of the library), for
  statistics whose scalars have leading axes (``count.shape``, e.g. the
  steps of a ``scan``) in front of the features: the result is that of all
  the entries' inputs taken together.

  Args:
    stats: statistics with ``count.ndim`` leading axes in every field.

  Returns:
    The merged :class:`LayerStats`, with scalar ``count``. With no entries
    (a ``scan`` of length 0), the statistics of no data: zero count, batch
    size and positions, zero mean and variance (see :func:`has_data`).
  """
  lead = stats.count.ndim
  if lead == 0:
    return stats
  feature_shape = stats.mean.shape[lead:]
  if not stats.count.size:
    zeros = jnp.zeros(feature_shape, stats.mean.dtype)
    zero = jnp.zeros([], stats.count.dtype)
    return LayerStats(zeros, zeros, zero, zero, zero, stats.spec, zeros)
  flat = lambda a: a.reshape((-1,) + a.shape[lead:])
  count = flat(stats.count)
  mean = flat(stats.mean)
  per_feature = lambda c: c.reshape(c.shape + (1,) * len(feature_shape))
  # Deviations from one entry's mean (the one with most data, so an empty
  # accumulator's zero mean is never the reference) are exact in float
  # arithmetic where the means are close; the corrected two-pass rule then
  # keeps a large mean with a small spread accurate, as in input_statistics.
  reference = mean[jnp.argmax(count)]
  deviation = mean - reference[None]
  if stats.mean_residual is not None:
    deviation = deviation + flat(stats.mean_residual)
  weight = per_feature(count)
  merged_mean, residual, variance = _combine_about(
      reference, jnp.sum(count),
      jnp.sum(weight * deviation, axis=0),
      jnp.sum(weight * (flat(stats.variance) + jnp.square(deviation)),
              axis=0),
  )
  batch_size = flat(stats.batch_size)
  total_batch = jnp.sum(batch_size)
  positions = jnp.sum(batch_size * flat(stats.positions)) / jnp.maximum(
      total_batch, 1)
  return LayerStats(merged_mean, variance, jnp.sum(count), total_batch,
                    positions, stats.spec, residual)


def has_data(stats: LayerStats) -> jax.Array:
  """Whether the statistics summarise any input (``count > 0``).

  A layer inside a ``scan`` of length 0 (variable-length code) sees no
  input in that pass: its merged statistics have zero count, and
  ``scale_by_bnp`` leaves its running statistics and its gradient
  unchanged.
  """
  return stats.count > 0


def unstack(stats: LayerStats, spec: LayerSpec | None = None) -> LayerStats:
  """Statistics stacked along leading axes, one independent layer a slice.

  For a kernel stacked the same way (``nn.scan``/``nn.vmap`` with the
  parameters on ``variable_axes``, a stacked kernel a ``lax.scan`` slices):
  the leading axes stay, as independent axes of the layer; the scalars,
  equal for slices that see batches of the same size, are averaged.

  Args:
    stats: statistics with ``count.ndim`` leading axes in every field.
    spec: the layout of the stacked kernel; by default the recorded
      per-slice layout with the stacked axes put in front, as independent
      axes.

  Returns:
    The :class:`LayerStats` of the stacked layer, with scalar ``count``.
  """
  lead = stats.count.ndim
  if lead == 0:
    return stats
  axes = tuple(range(lead))
  if spec is None and stats.spec is not None:
    shift = lambda t: tuple(a + lead for a in t)
    spec = LayerSpec(
        spatial_axes=shift(stats.spec.spatial_axes),
        fan_in_axes=shift(stats.spec.fan_in_axes),
        independent_axes=axes + shift(stats.spec.independent_axes),
        feature_groups=stats.spec.feature_groups,
    )
  return stats.replace(
      count=stats.count.mean(axes), batch_size=stats.batch_size.mean(axes),
      positions=stats.positions.mean(axes), spec=spec)


def all_reduce_statistics(stats, axis_name) -> object:
  """Combines per-device statistics into those of the global batch.

  For use inside ``shard_map``/``pmap`` (or any collective context) with the
  batch split over ``axis_name``. Means are weighted by counts and variances
  combined by the law of total variance, so the result is exactly the
  statistics of the concatenated batch (to float rounding), not a mean of
  per-device variances. Batch sizes add up.

  Args:
    stats: a tree of :class:`LayerStats` (as returned by
      ``bnp_optax.linen.apply``).
    axis_name: the mapped axis (or tuple of axes) the batch is split over.

  Returns:
    The same tree, every device holding the global statistics.

  Example:
    Two "devices" (a ``vmap`` with an axis name stands in for ``shard_map``)
    holding halves of a batch agree on the statistics of the whole of it:

    >>> import jax, jax.numpy as jnp
    >>> import bnp_optax
    >>> halves = jnp.array([[[0.], [2.]], [[4.], [10.]]])
    >>> combined = jax.vmap(
    ...     lambda x: bnp_optax.all_reduce_statistics(
    ...         bnp_optax.input_statistics(x), 'devices'),
    ...     axis_name='devices')(halves)
    >>> print(combined.mean[:, 0], combined.variance[:, 0])
    [4. 4.] [14. 14.]
  """
  is_stats = lambda x: isinstance(x, LayerStats)

  def reduce_one(s: LayerStats) -> LayerStats:
    total, weighted_mean, batch_size, weighted_positions = lax.psum(
        (s.count, s.count * s.mean, s.batch_size, s.batch_size * s.positions),
        axis_name,
    )
    # The first round's mean is the same on every device: a common reference
    # whose rounding error the corrected two-pass rule removes.
    reference = weighted_mean / total
    deviation = s.deviation_from(reference)
    mean, residual, variance = _combine_about(reference, total, *lax.psum(
        (s.count * deviation,
         s.count * (s.variance + jnp.square(deviation))),
        axis_name,
    ))
    return LayerStats(
        mean=mean,
        variance=variance,
        count=total,
        batch_size=batch_size,
        positions=weighted_positions / batch_size,
        spec=s.spec,
        mean_residual=residual,
    )

  return jax.tree.map(reduce_one, stats, is_leaf=is_stats)
