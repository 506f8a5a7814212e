"""The BNP gradient transformation (Lange, Helfrich & Ye, Algorithms 2-3)."""

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import statistics

# The paper's defaults (Algorithm 2).
DEFAULT_EPS1 = 1e-2
DEFAULT_EPS2 = 1e-4
DEFAULT_RHO = 0.99


class RunningStats(NamedTuple):
  """Running mean and variance of one layer's inputs.

  Attributes:
    mean: running mean ``mu``, the layer's fan-in shape; starts at 0.
    variance: running variance ``sigma^2``, same shape; starts at 1.
  """

  mean: jax.Array
  variance: jax.Array


class ScaleByBNPState(NamedTuple):
  """State of :func:`scale_by_bnp`.

  Attributes:
    count: number of updates taken, int32.
    running_stats: ``{layer path: RunningStats}`` for every preconditioned
      layer, keyed like ``'Block_0/Dense_1'``. Two vectors per layer, in
      float32 (float64 when the parameters are float64), and nothing that
      grows with the batch or the activations.
  """

  count: jax.Array
  running_stats: dict[str, RunningStats]


def _is_concrete(value: Any) -> bool:
  return not isinstance(value, jax.core.Tracer)


def _check_hyperparameters(eps1, eps2, rho) -> None:
  """Rejects invalid concrete values; traced ones are trusted."""
  for name, value in (('eps1', eps1), ('eps2', eps2)):
    if _is_concrete(value) and not bool(jnp.all(jnp.asarray(value) >= 0)):
      raise ValueError(f'scale_by_bnp: {name} must be >= 0, got {value}.')
  if _is_concrete(rho):
    r = jnp.asarray(rho)
    if not bool(jnp.all((r >= 0) & (r < 1))):
      raise ValueError(f'scale_by_bnp: rho must be in [0, 1), got {rho}.')


def _place(
    vector: jax.Array, positions: tuple[int, ...], view_shape: tuple[int, ...]
) -> jax.Array:
  """Broadcasts ``vector`` (dims at kernel ``positions``) to the kernel."""
  order = sorted(range(len(positions)), key=lambda i: positions[i])
  vector = jnp.transpose(vector, order)
  shape = [1] * len(view_shape)
  for dim, position in zip(vector.shape, sorted(positions)):
    shape[position] = dim
  return vector.reshape(shape)


def update_running_stats(
    running: RunningStats,
    batch: statistics.LayerStats,
    rho: chex.Numeric,
) -> RunningStats:
  """Step 2 of Algorithms 2-3, with the batch-size-1 rule and a finite guard.

  When the batch statistics summarise a single value per feature
  (``count == 1``: a Dense layer at batch size 1), the batch variance is
  meaningless; as the paper suggests (end of Sec. 3.3), it is replaced by the
  squared deviation of that value from the running mean *before* this step's
  update, ``(h - mu_old)^2``: the previous estimate, which has not yet seen
  ``h``. (A Conv layer at batch size 1 still has ``r * s`` values per channel
  and uses their variance, Eq. 22.)

  Where a feature's batch statistics are not finite, its running statistics
  are left unchanged, so one bad batch cannot poison them.

  Args:
    running: the running statistics before this step.
    batch: this step's batch statistics.
    rho: the decay of the running averages.

  Returns:
    The running statistics after this step.
  """
  dtype = running.mean.dtype
  batch_mean = batch.mean.astype(dtype)
  batch_variance = batch.variance.astype(dtype)
  batch_variance = jnp.where(
      batch.count == 1,
      batch_variance + jnp.square(batch_mean - running.mean),
      batch_variance,
  )
  rho = jnp.asarray(rho, dtype)
  mean = rho * running.mean + (1 - rho) * batch_mean
  variance = rho * running.variance + (1 - rho) * batch_variance
  # Per feature, so the guard fuses into the update (no reduction).
  finite = jnp.isfinite(batch_mean) & jnp.isfinite(batch_variance)
  return RunningStats(
      mean=jnp.where(finite, mean, running.mean),
      variance=jnp.where(finite, variance, running.variance),
  )


def debiased(
    running: RunningStats, rho: chex.Numeric, count: jax.Array
) -> RunningStats:
  r"""Removes the pull of the initial ``mu = 0, sigma^2 = 1`` (as Adam does).

  After ``t`` updates the running averages are
  ``rho^t init + (1 - rho) sum_k rho^(t-k) x_k``; the estimate
  ``(running - rho^t init) / (1 - rho^t)`` weights the observations alone.
  """
  dtype = running.mean.dtype
  decay = jnp.asarray(rho, dtype) ** count.astype(dtype)
  weight = 1 - decay
  return RunningStats(
      mean=running.mean / weight,
      variance=jnp.maximum((running.variance - decay) / weight, 0),
  )


class _Packed(NamedTuple):
  """Layers whose statistics share a dtype, laid end to end in one vector.

  The small per-feature work of a step (running averages, guard,
  regularised inverse) is done once on the concatenated vectors instead of
  once per layer: on accelerators and CPUs alike every small operation is a
  kernel launch, and a network has dozens of layers. ``offsets[i]`` is where
  layer ``i``'s flattened statistics start. Every layer's statistics are
  ``segments[i]`` contiguous runs of ``segment_sizes[i]`` features (one run
  per output unit's fan-in: per slice along independent axes, per group of
  a grouped convolution) over which ``max(sigma^2)`` is taken.
  """

  names: tuple[str, ...]
  offsets: tuple[int, ...]
  sizes: tuple[int, ...]
  segments: tuple[int, ...]
  segment_sizes: tuple[int, ...]

  def split(self, vector: jax.Array) -> list[jax.Array]:
    return [
        vector[o : o + n] for o, n in zip(self.offsets, self.sizes)
    ]

  def per_feature(self, per_layer: list[jax.Array]) -> jax.Array:
    """Broadcasts one value per layer (or per segment) to its features."""
    return jnp.concatenate([
        jnp.broadcast_to(
            jnp.reshape(v, (-1, 1)), (m, k)
        ).reshape(-1)
        for v, m, k in zip(per_layer, self.segments, self.segment_sizes)
    ])

  def segment_reduce(self, vector: jax.Array, reduce_fn) -> list[jax.Array]:
    """``reduce_fn`` over each segment, one (small) reduction per layer."""
    return [
        reduce_fn(part.reshape(m, k), axis=1)
        for part, m, k in zip(
            self.split(vector), self.segments, self.segment_sizes
        )
    ]


def _segment_layout(
    spec: statistics.LayerSpec, statistics_shape: tuple[int, ...]
) -> tuple[int, int]:
  """``(segments, segment size)`` of a layer's flattened statistics."""
  independent = math.prod(statistics_shape[: len(spec.independent_axes)])
  fan_in = math.prod(statistics_shape[len(spec.independent_axes) :])
  groups = spec.feature_groups
  return independent * groups, fan_in // groups


def _view_shapes(spec, kernel_shape, stats_shape):
  """The kernel and statistics shapes with a grouped output axis split.

  Returns ``(view_shape, stats_view, spatial, fan_in, independent,
  outputs)``: in the view, a grouped convolution's output axis is
  ``(groups, outputs per group)`` and the group axis is independent (each
  group has its own input channels); the statistics are indexed by the
  view's independent then fan-in axes.
  """
  spatial, fan_in = spec.spatial_axes, spec.fan_in_axes
  independent = spec.independent_axes
  outputs = spec.output_axes(len(kernel_shape))
  view_shape = tuple(kernel_shape)
  stats_view = tuple(stats_shape)
  if spec.feature_groups > 1:
    groups, (axis,) = spec.feature_groups, outputs
    view_shape = (
        kernel_shape[:axis]
        + (groups, kernel_shape[axis] // groups)
        + kernel_shape[axis + 1 :]
    )
    moved = lambda axes: tuple(a if a < axis else a + 1 for a in axes)
    spatial, fan_in = moved(spatial), moved(fan_in)
    independent = moved(independent) + (axis,)
    outputs = (axis + 1,)
    stats_view = stats_shape[:-1] + (groups, stats_shape[-1] // groups)
  return view_shape, stats_view, spatial, fan_in, independent, outputs


def precondition_layer(
    kernel_grad: jax.Array,
    bias_grad: jax.Array | None,
    spec: statistics.LayerSpec,
    *,
    mean: jax.Array,
    inverse: jax.Array,
    mean_square: jax.Array,
    q_squared: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
  r"""Steps 4-5 of Algorithms 2-3: ``(1/q^2) P P^T`` applied to one layer.

  With ``mu`` the running mean and ``s = \tilde\sigma^2 q^2`` (both
  broadcast over the kernel's window and output axes) and ``G_w``, ``G_b``
  the raw gradients:

  .. math::
    G_w \leftarrow (G_w - \mu G_b) / s,
    \quad G_b \leftarrow G_b / q^2 - \textstyle\sum \mu G_w,

  the sum running over the window and fan-in axes, with the new ``G_w``.
  It is computed without a kernel-sized temporary, as
  ``sum (mu / s) G_w - G_b |window| sum_{fan-in} mu^2 / s``, a contraction
  of the raw gradient; the new ``G_w`` then has one consumer, the
  optimizer's elementwise update, and fuses into it. Without a bias there
  is nothing to absorb the centring: the kernel gradient is only scaled,
  ``G_w / s``.

  Args:
    kernel_grad: the kernel gradient.
    bias_grad: the bias gradient, or ``None``.
    spec: the kernel's layout.
    mean: ``mu``, the layer's statistics shape.
    inverse: ``1 / s``, the layer's statistics shape.
    mean_square: ``|window| sum_{fan-in} mu^2 / s``, one value per segment
      (output unit's fan-in).
    q_squared: ``q^2``, a scalar.

  Returns:
    The preconditioned kernel and bias gradients, in their own dtypes.
  """
  dtype = mean.dtype
  kernel_shape = kernel_grad.shape
  view_shape, stats_view, _, fan_in, independent, outputs = _view_shapes(
      spec, kernel_shape, mean.shape
  )
  stats_positions = independent + fan_in
  mean, inverse = mean.reshape(stats_view), inverse.reshape(stats_view)
  wide_inverse = _place(inverse, stats_positions, view_shape)
  g_w = kernel_grad.astype(dtype).reshape(view_shape)
  if bias_grad is None:
    new_g_w = g_w * wide_inverse
    return new_g_w.reshape(kernel_shape).astype(kernel_grad.dtype), None
  bias_positions = independent + outputs
  bias_view = tuple(view_shape[a] for a in bias_positions)
  g_b = bias_grad.astype(dtype).reshape(bias_view)
  wide_mean = _place(mean, stats_positions, view_shape)
  new_g_w = (g_w - wide_mean * _place(g_b, bias_positions, view_shape)) * (
      wide_inverse
  )
  # A leading unit axis keeps the contraction a matrix product: XLA:CPU
  # hands ``(1, n) @ (n, m)`` to its GEMM library but compiles a loop for
  # the vector-matrix ``(n,) @ (n, m)``, which costs compile time.
  letters = 'abcdefghijklmnopqrstuvwxy'[: len(view_shape)]
  absorbed = jnp.einsum(
      'z' + ''.join(letters[p] for p in stats_positions) + ',' + letters
      + '->z' + ''.join(letters[p] for p in bias_positions),
      (mean * inverse)[None], g_w, precision=jax.lax.Precision.HIGHEST,
  )[0]
  mean_square = mean_square.reshape(
      stats_view[: len(independent)] + (1,) * len(outputs)
  )
  new_g_b = g_b / q_squared - (absorbed - mean_square * g_b)
  return (
      new_g_w.reshape(kernel_shape).astype(kernel_grad.dtype),
      new_g_b.reshape(bias_grad.shape).astype(bias_grad.dtype),
  )


def _precondition_layers(
    names, tree, specs, stats, running_stats, leaves, *, dtype, count, rho,
    eps1, eps2, debias,
) -> dict[str, RunningStats]:
  """Steps 2-5 for layers whose statistics have one dtype.

  Steps 2-3 (running averages, ``sigma~^2``, ``q^2``, the inverse) are done
  on all the layers' statistics at once, concatenated; step 4-5 per layer.
  Writes the preconditioned gradients into ``leaves``.

  Returns:
    The new running statistics of these layers.
  """
  layers = [tree.layers[name] for name in names]
  shapes = [running_stats[name].mean.shape for name in names]
  sizes = tuple(math.prod(shape) for shape in shapes)
  layout = [
      _segment_layout(specs[name], shape) for name, shape in zip(names, shapes)
  ]
  packed = _Packed(
      names=tuple(names),
      offsets=tuple(int(o) for o in np.cumsum((0,) + sizes[:-1])),
      sizes=sizes,
      segments=tuple(m for m, _ in layout),
      segment_sizes=tuple(k for _, k in layout),
  )
  concat = lambda vectors: jnp.concatenate(
      [v.astype(dtype).reshape(-1) for v in vectors]
  )
  batches = [stats[name] for name in names]
  batch = statistics.LayerStats(
      mean=concat([b.mean for b in batches]),
      variance=concat([b.variance for b in batches]),
      count=packed.per_feature([b.count for b in batches]),
      batch_size=None,
      positions=None,
  )
  running = RunningStats(
      mean=concat([running_stats[name].mean for name in names]),
      variance=concat([running_stats[name].variance for name in names]),
  )
  running = update_running_stats(running, batch, rho)
  new_running = {
      name: RunningStats(mean.reshape(shape), variance.reshape(shape))
      for name, shape, mean, variance in zip(
          names, shapes, packed.split(running.mean),
          packed.split(running.variance),
      )
  }
  if debias:
    running = debiased(running, rho, count)
  mean, variance = running
  largest = packed.segment_reduce(variance, jnp.max)
  fan_in_sizes = jnp.asarray(
      [specs[n].fan_in_size(layer.kernel_shape)
       for n, layer in zip(names, layers)], dtype)
  q_squared = jnp.maximum(
      fan_in_sizes / jnp.stack([b.batch_size for b in batches]).astype(dtype),
      jnp.sqrt(jnp.stack([b.positions for b in batches]).astype(dtype)),
  )
  per_layer_q = [q_squared[i] for i in range(len(names))]
  regularised = (
      variance
      + jnp.asarray(eps1, dtype) * packed.per_feature(largest)
      + jnp.asarray(eps2, dtype)
  )
  inverse = 1 / (regularised * packed.per_feature(per_layer_q))
  windows = [
      math.prod(layer.kernel_shape[a] for a in specs[n].spatial_axes)
      for n, layer in zip(names, layers)
  ]
  mean_squares = packed.segment_reduce(mean * mean * inverse, jnp.sum)
  for i, (name, layer, layer_mean, layer_inverse) in enumerate(
      zip(names, layers, packed.split(mean), packed.split(inverse))
  ):
    bias_grad = None if layer.bias_index is None else leaves[layer.bias_index]
    new_kernel, new_bias = precondition_layer(
        leaves[layer.kernel_index],
        bias_grad,
        specs[name],
        mean=layer_mean.reshape(shapes[i]),
        inverse=layer_inverse.reshape(shapes[i]),
        mean_square=windows[i] * mean_squares[i],
        q_squared=per_layer_q[i],
    )
    leaves[layer.kernel_index] = new_kernel
    if new_bias is not None:
      leaves[layer.bias_index] = new_bias
  return new_running


def scale_by_bnp(
    *,
    eps1: chex.Numeric = DEFAULT_EPS1,
    eps2: chex.Numeric = DEFAULT_EPS2,
    rho: chex.Numeric = DEFAULT_RHO,
    debias: bool = False,
    layer_specs: layers_lib.LayerSpecs = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Batch Normalization Preconditioning of Dense and Conv gradients.

  For every layer with a ``kernel`` (and usually a ``bias``), BNP keeps
  running means ``mu`` and variances ``sigma^2`` of the layer's *input*
  activations and preconditions the layer's gradients with them
  (Algorithms 2 and 3 of the paper), an implicit change of variables that
  centres and normalises the inputs the way BatchNorm does, without changing
  the network. Each step:

  1. take the batch statistics ``mu_H, sigma_H^2`` from ``layer_stats``
     (per input feature, or per input channel over batch and space);
  2. ``mu <- rho mu + (1 - rho) mu_H``,
     ``sigma^2 <- rho sigma^2 + (1 - rho) sigma_H^2`` (from ``mu = 0``,
     ``sigma^2 = 1``);
  3. ``sigma~^2 = sigma^2 + eps1 max(sigma^2) + eps2``,
     ``q^2 = max(n_in / N, sqrt(r s))`` (``r s = 1`` for Dense);
  4. ``G_w <- (G_w - mu G_b) / sigma~^2 / q^2``;
  5. ``G_b <- G_b / q^2 - sum mu G_w`` with the new ``G_w``.

  The output is the preconditioned gradient, not a step: chain it with any
  optimizer (see :func:`bnp` for BNP + SGD). Parameters that no statistic
  covers (anything outside a mapping with a ``kernel``, e.g. LayerNorm
  scales and embeddings) pass through unchanged; see
  :func:`describe_coverage`. Layers without a bias get the scaling only.

  Batch size 1: a Dense layer's batch variance is replaced by
  ``(h - mu)^2`` with the running mean before the update (paper, end of
  Sec. 3.3). Convolutions: ``r s`` is the number of *output* positions per
  example (the positions at which the kernel is applied), which is the input
  size for the paper's stride-1 SAME convolutions.

  Args:
    eps1: relative regulariser of the variance, ``>= 0``.
    eps2: absolute regulariser of the variance, ``>= 0``.
    rho: decay of the running averages, in ``[0, 1)``; ``0`` uses the batch
      statistics alone.
    debias: not in the paper, off by default. When true, the statistics used
      to precondition are the running averages with the pull of their initial
      values removed, ``(avg - rho^t init) / (1 - rho^t)`` after ``t`` steps,
      as Adam debiases its moments; the state still holds the plain averages.
    layer_specs: optional ``{layer path: LayerSpec}`` for kernels that are
      not laid out as Flax ``Dense`` (``(n_in, n_out)``) or ``Conv``
      (``(*window, c_in, c_out)``) kernels, needed when the optimizer state
      is created (``bnp_optax.linen.layer_specs`` and
      ``bnp_optax.nnx.layer_specs`` compute them for a model).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword argument ``layer_stats`` (as returned by
    ``bnp_optax.linen.apply``). Hyperparameters may be traced values, so it
    works under ``optax.inject_hyperparams``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import bnp_optax
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.array([[1., 100.], [3., 300.], [2., 500.]])
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> tx = optax.chain(bnp_optax.scale_by_bnp(), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> def loss_fn(params):
    ...   y, layer_stats = bnp_optax.linen.apply(model, {'params': params}, x)
    ...   return jnp.mean(y ** 2), layer_stats
    >>> grads, layer_stats = jax.grad(loss_fn, has_aux=True)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                layer_stats=layer_stats)
    >>> running = opt_state[0].running_stats
    >>> sorted(running)
    ['layers_0', 'layers_2']
    >>> print(jnp.round(running['layers_0'].mean, 4))  # 0.01 * batch mean
    [0.02 3.  ]

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Sections 3.3 and 4, Algorithms 2 and 3).
  """
  _check_hyperparameters(eps1, eps2, rho)

  def init_fn(params: optax.Params) -> ScaleByBNPState:
    tree = layers_lib.parse_tree(params, layer_specs)
    running = {}
    for name, layer in tree.layers.items():
      kernel = tree.leaves[layer.kernel_index]
      dtype = statistics.statistics_dtype(kernel.dtype)
      shape = layer.spec.statistics_shape(layer.kernel_shape)
      running[name] = RunningStats(
          mean=jnp.zeros(shape, dtype), variance=jnp.ones(shape, dtype)
      )
    return ScaleByBNPState(
        count=jnp.zeros([], jnp.int32), running_stats=running
    )

  def update_fn(
      updates: optax.Updates,
      state: ScaleByBNPState,
      params: optax.Params | None = None,
      *,
      layer_stats: Any = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleByBNPState]:
    del params, extra_args
    if layer_stats is None:
      raise ValueError(
          'scale_by_bnp: update() needs the keyword argument layer_stats, the '
          'input statistics of every Dense/Conv layer from this forward pass; '
          'get them with `output, layer_stats = bnp_optax.linen.apply(model, '
          'variables, x)` and call `tx.update(grads, state, params, '
          'layer_stats=layer_stats)`.'
      )
    tree = layers_lib.parse_tree(updates, layer_specs)
    stats = layers_lib.flatten_layer_stats(layer_stats)
    specs = layers_lib.match_statistics(tree, stats)
    if set(state.running_stats) != set(tree.layers):
      raise ValueError(
          'scale_by_bnp: the optimizer state holds running statistics for '
          f'{sorted(state.running_stats)} but the gradients have layers '
          f'{sorted(tree.layers)}; was the state made for another model?'
      )
    count = optax.safe_increment(state.count)
    by_dtype: dict[Any, list[str]] = {}
    for name, layer in tree.layers.items():
      running = state.running_stats[name]
      if running.mean.shape != specs[name].statistics_shape(
          layer.kernel_shape
      ):
        raise ValueError(layers_lib.state_mismatch_message(
            name, running.mean.shape, specs[name], layer.kernel_shape))
      by_dtype.setdefault(jnp.dtype(running.mean.dtype), []).append(name)
    leaves = list(tree.leaves)
    new_running = {}
    for dtype, names in by_dtype.items():
      new_running.update(_precondition_layers(
          names, tree, specs, stats, state.running_stats, leaves,
          dtype=dtype, count=count, rho=rho, eps1=eps1, eps2=eps2,
          debias=debias,
      ))
    new_updates = jax.tree_util.tree_unflatten(tree.treedef, leaves)
    return new_updates, ScaleByBNPState(
        count=count,
        running_stats={name: new_running[name] for name in tree.layers},
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
