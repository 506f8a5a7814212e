"""BN with 4 Things (Summers and Dinneen, 2020) as a Flax linen layer.

The BNP paper compares against "BN with 4 Things" (Figures 4 and 5): Batch
Normalization with the four improvements of C. Summers and M. J. Dinneen,
*Four Things Everyone Should Know to Improve Batch Normalization*, ICLR 2020
(https://openreview.net/forum?id=HJx8HANFDH). As the BNP paper lists them
(Section 5.2): for small batches BN is combined with GroupNorm, for larger
batches with Ghost Batch Normalization; weight decay on BN's ``gamma`` and
``beta``; and example statistics mixed in at inference. Here:

1. **Ghost Batch Normalization** (:class:`BN4`, ``ghost_batch_size``): in
   training a batch of ``N`` examples is cut into ``k = ceil(N / g)`` ghost
   batches (``g`` = ``ghost_batch_size``), each normalised with its own mean
   and variance over (its examples, height, width). When ``g`` divides ``N``
   these are ``N / g`` ghost batches of exactly ``g`` examples; otherwise
   the sizes are as ``numpy.array_split(range(N), k)`` makes them (the first
   ``N mod k`` one example larger, all within one example of each other);
   when ``N <= g`` (or ``g`` is None) the whole batch is one ghost batch,
   plain BatchNorm. The running averages are updated once per step with the
   size-weighted average of the ghost batches' means and (biased) variances
   (``var`` is then the within-ghost-batch variance, the one the layer
   normalises with).
2. **Batch + Group Normalization** for small batches (``group_size > 1``).
   The BNP paper names the combination but not its formula, and we do not
   quote Summers and Dinneen's: this is **our reading**. By default
   (``combine='joint'``) the statistics are those of GroupNorm and of
   BatchNorm at once: for each group of ``group_size`` consecutive channels,
   one mean and variance over (the ghost batch, height, width, the group's
   channels)::

     mu_G = mean_{n, h, w, c in G} x[n, h, w, c]
     var_G = mean_{n, h, w, c in G} (x[n, h, w, c] - mu_G)^2

   At batch size 1 this is GroupNorm, with ``group_size == 1`` BatchNorm;
   running averages are kept per group (stored per channel, equal within a
   group) and used at inference as BatchNorm's. With
   ``combine='sequential'`` it is the composition instead: GroupNorm without
   affine parameters (per example, over height, width and the group,
   ``gn_epsilon``), then BatchNorm with ``group_size`` 1 on its output. We
   made ``'joint'`` the default because the composition is degenerate at
   batch size 1 on a Dense layer (the BatchNorm part sees one value per
   feature, so its output is ``beta`` whatever the input), and the paper
   uses BN with 4 Things at batch size 1 on the CNN, whose Dense(64) layer
   is normalised too.
3. **Inference example weighing** (``example_weight`` = ``alpha``): at
   inference each example is normalised with the mixture of its own
   statistics ``mu_x, var_x`` (over its height, width and, with groups, the
   group's channels) and the population (running) statistics::

     mu = alpha mu_x + (1 - alpha) mu_pop
     var = alpha var_x + (1 - alpha) var_pop
           + alpha (1 - alpha) (mu_x - mu_pop)^2

   the mean and variance of the mixture of the two distributions. For a
   Dense layer with ``group_size == 1`` an example has one value per
   feature, so ``mu_x = x`` and ``var_x = 0``: ``var`` is then ``(1 -
   alpha) var_pop + alpha (1 - alpha) (x - mu_pop)^2``, still positive.
   ``alpha = 0`` is BatchNorm's inference. Summers and Dinneen choose alpha
   on held-out data; the default 0.1 (:data:`DEFAULT_EXAMPLE_WEIGHT`) is
   ours.
4. **Weight decay on gamma and beta** only: an L2 term ``wd * p`` added to
   the gradient of every :class:`BN4` layer's ``scale`` and ``bias`` and of
   nothing else (coupled L2, before Adam). It lives in the optimizer, not in
   the model: :func:`norm_param_mask` selects the parameters and the
   harness's ``make_optimizer`` chains ``optax.add_decayed_weights(wd,
   mask=norm_param_mask)`` before the base optimizer. The default
   ``wd = 5e-4`` (:data:`DEFAULT_NORM_WEIGHT_DECAY`) is ours.

Which of 1 and 2 applies is decided by the *training* batch size (the
harness's ``group_norm_below``, default 16): below it Batch + Group
Normalization with groups of 4 channels (the paper's GN group size) and no
ghost batches, otherwise Ghost BN with ``ghost_batch_size`` (default 16) and
``group_size`` 1. It is fixed when the model is built, so evaluation (at
another batch size) uses the same layer. ``epsilon = 1e-3`` and ``momentum
= 0.99`` are TensorFlow's BatchNorm defaults, as the harness's ``bn``.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_GHOST_BATCH_SIZE = 16
DEFAULT_GROUP_NORM_BELOW = 16
DEFAULT_EXAMPLE_WEIGHT = 0.1
DEFAULT_NORM_WEIGHT_DECAY = 5e-4
DEFAULT_GROUP_SIZE = 4
COMBINES = ('joint', 'sequential')


def ghost_segments(batch: int, ghost_batch_size: int | None) -> np.ndarray:
  """The ghost batch of each example: ``int32[batch]``, sorted.

  Args:
    batch: the batch size ``N``.
    ghost_batch_size: ``g``; None: the whole batch is one ghost batch.

  Returns:
    ``k = ceil(N / g)`` ghost batches as ``numpy.array_split`` cuts
    ``range(N)`` into ``k`` parts (one if ``N <= g``).
  """
  if ghost_batch_size is None or batch <= ghost_batch_size:
    return np.zeros(batch, np.int32)
  k = -(-batch // ghost_batch_size)
  sizes = [len(p) for p in np.array_split(np.arange(batch), k)]
  return np.repeat(np.arange(k, dtype=np.int32), sizes)


def _capped_group_size(channels: int, group_size: int) -> int:
  """The largest divisor of ``channels`` that is at most ``group_size``."""
  size = max(1, min(group_size, channels))
  while channels % size:
    size -= 1
  return size


def _group_moments(x, segments, num_segments):
  """Per-segment mean and biased variance of ``x[N, S, G, g]`` -> ``[k, G]``.

  Two passes (the mean first, then the mean squared deviation), summed
  exactly with ``segment_sum`` (no matmul, so no reduced-precision TF32).
  """
  counts = np.bincount(segments, minlength=num_segments)
  per = x.shape[1] * x.shape[3]
  denom = jnp.asarray(counts * per, x.dtype)[:, None]

  def seg_mean(values):  # values: [N, G] sums over (S, g)
    return jax.ops.segment_sum(values, segments, num_segments,
                               indices_are_sorted=True) / denom

  mean = seg_mean(jnp.sum(x, axis=(1, 3)))
  centred = x - mean[segments][:, None, :, None]
  var = seg_mean(jnp.sum(jnp.square(centred), axis=(1, 3)))
  return mean, var, centred, counts


class BN4(nn.Module):
  """BatchNorm with Summers and Dinneen's (2020) improvements 1-3.

  Normalises over every axis but the last (features): ``x`` is ``[N,
  features]`` or ``[N, ..., features]``. See the module docstring for the
  math; the fourth improvement (weight decay on ``scale`` and ``bias``) is
  the optimizer's, via :func:`norm_param_mask`.

  Attributes:
    use_running_average: inference: the running statistics, mixed with the
      example's own by ``example_weight``.
    ghost_batch_size: training: normalise ghost batches of this many
      examples (see :func:`ghost_segments`); None: the whole batch.
    group_size: channels per group of the Batch + Group Normalization (1:
      plain BatchNorm statistics per channel); capped to the largest
      divisor of the feature count that is no larger.
    combine: ``'joint'`` (statistics over the batch and a group of channels
      at once) or ``'sequential'`` (GroupNorm without affine, then BatchNorm);
      only used when ``group_size > 1``.
    example_weight: ``alpha`` of the inference example weighing, in
      ``[0, 1]``; 0: plain BatchNorm inference.
    momentum: decay of the running mean and variance.
    epsilon: added to the variances.
    gn_epsilon: GroupNorm's epsilon in the ``'sequential'`` form.
  """

  use_running_average: bool | None = None
  ghost_batch_size: int | None = DEFAULT_GHOST_BATCH_SIZE
  group_size: int = 1
  combine: str = 'joint'
  example_weight: float = DEFAULT_EXAMPLE_WEIGHT
  momentum: float = 0.99
  epsilon: float = 1e-3
  gn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    if self.combine not in COMBINES:
      raise ValueError(f'combine must be one of {COMBINES}, got '
                       f'{self.combine!r}')
    if not 0.0 <= self.example_weight <= 1.0:
      raise ValueError('example_weight must be in [0, 1], got '
                       f'{self.example_weight}')
    n, features = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape((n, -1, features))
    g = _capped_group_size(features, self.group_size)
    if g > 1 and self.combine == 'sequential':
      # GroupNorm without affine, per example; then BatchNorm per channel.
      xg = xf.reshape((n, xf.shape[1], features // g, g))
      _, var, centred, _ = _group_moments(
          xg, np.arange(n, dtype=np.int32), n)
      xf = (centred / jnp.sqrt(var + self.gn_epsilon)[:, None, :, None]
            ).reshape(xf.shape)
      g = 1
    groups = features // g
    xg = xf.reshape((n, xf.shape[1], groups, g))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,),
                           jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    if use_running_average:
      # Per group (the stored values are equal within a group).
      mu_pop = ra_mean.value.reshape((groups, g)).mean(-1)
      var_pop = ra_var.value.reshape((groups, g)).mean(-1)
      mu, var = mu_pop[None], var_pop[None]
      alpha = self.example_weight
      if alpha:
        # Each example's statistics over its positions (and group).
        mu_x, var_x, _, _ = _group_moments(
            xg, np.arange(n, dtype=np.int32), n)
        mu = alpha * mu_x + (1 - alpha) * mu
        var = (alpha * var_x + (1 - alpha) * var
               + alpha * (1 - alpha) * jnp.square(mu_x - mu_pop[None]))
      y = (xg - mu[:, None, :, None]) / jnp.sqrt(
          var + self.epsilon)[:, None, :, None]
    else:
      segments = ghost_segments(n, self.ghost_batch_size)
      k = int(segments[-1]) + 1
      mean, var, centred, counts = _group_moments(xg, segments, k)
      y = centred / jnp.sqrt(var + self.epsilon)[segments][:, None, :, None]
      if not self.is_initializing():
        w = jnp.asarray(counts / n, jnp.float32)[:, None]
        batch_mean = jnp.repeat(jnp.sum(w * mean, 0), g)
        batch_var = jnp.repeat(jnp.sum(w * var, 0), g)
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(
            batch_mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(
            batch_var)
    shape = (1,) * (x.ndim - 1) + (features,)
    y = y.reshape(x.shape) * scale.reshape(shape) + bias.reshape(shape)
    return y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BN4Settings:
  """How the harness builds its :class:`BN4` layers (one per run).

  Attributes:
    ghost_batch_size: Ghost BN's ghost batch size.
    group_norm: Batch + Group Normalization (``group_size`` channels per
      group, no ghost batches) instead of Ghost BN.
    group_size: channels per group when ``group_norm``.
    example_weight: ``alpha`` of the inference example weighing.
  """

  ghost_batch_size: int = DEFAULT_GHOST_BATCH_SIZE
  group_norm: bool = False
  group_size: int = DEFAULT_GROUP_SIZE
  example_weight: float = DEFAULT_EXAMPLE_WEIGHT

  @classmethod
  def for_batch_size(cls, batch_size: int, *,
                     ghost_batch_size: int = DEFAULT_GHOST_BATCH_SIZE,
                     group_norm_below: int = DEFAULT_GROUP_NORM_BELOW,
                     example_weight: float = DEFAULT_EXAMPLE_WEIGHT
                     ) -> 'BN4Settings':
    """Batch + Group Norm below ``group_norm_below`` examples, else Ghost BN.

    Example:
      >>> BN4Settings.for_batch_size(2).group_norm
      True
      >>> BN4Settings.for_batch_size(128).group_norm
      False
    """
    return cls(ghost_batch_size=ghost_batch_size,
               group_norm=batch_size < group_norm_below,
               example_weight=example_weight)

  def layer(self, train: bool) -> BN4:
    """A fresh layer, in training (batch statistics) or inference mode."""
    if self.group_norm:
      return BN4(use_running_average=not train, ghost_batch_size=None,
                 group_size=self.group_size,
                 example_weight=self.example_weight)
    return BN4(use_running_average=not train,
               ghost_batch_size=self.ghost_batch_size, group_size=1,
               example_weight=self.example_weight)


def norm_param_mask(params):
  """True at the ``scale``/``bias`` of every :class:`BN4` layer, else False.

  A :class:`BN4` layer is recognised by its automatic Flax name
  (``BN4_0``, ``BN4_1``, ...); for the mask of
  ``optax.add_decayed_weights`` (Summers and Dinneen's weight decay on
  ``gamma`` and ``beta``).
  """
  def is_norm(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    return (len(keys) >= 2 and keys[-1] in ('scale', 'bias')
            and isinstance(keys[-2], str) and keys[-2].startswith('BN4_'))
  return jax.tree_util.tree_map_with_path(is_norm, params)
