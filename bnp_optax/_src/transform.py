"""The BNP gradient transformation (Lange, Helfrich & Ye, Algorithms 2-3)."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
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


def _broadcast_shape(kernel_ndim: int, axes: tuple[int, ...], shape) -> list:
  """Shape that broadcasts a fan-in-shaped vector against the kernel."""
  out = [1] * kernel_ndim
  for axis, size in zip(axes, shape):
    out[axis] = size
  return out


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

  If the batch statistics are not finite, the running statistics are left
  unchanged, so one bad batch cannot poison them.

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
  finite = jnp.all(jnp.isfinite(batch_mean)) & jnp.all(
      jnp.isfinite(batch_variance)
  )
  return RunningStats(
      mean=jnp.where(finite, mean, running.mean),
      variance=jnp.where(finite, variance, running.variance),
  )


def precondition_layer(
    kernel_grad: jax.Array,
    bias_grad: jax.Array | None,
    running: RunningStats,
    spec: layers_lib.LayerSpec,
    *,
    fan_in_size: int,
    batch_size: jax.Array,
    positions: jax.Array,
    eps1: chex.Numeric,
    eps2: chex.Numeric,
) -> tuple[jax.Array, jax.Array | None]:
  r"""Steps 3-5 of Algorithms 2-3: ``(1/q^2) P P^T`` applied to one layer.

  With ``mu``, ``sigma^2`` the running statistics (broadcast over the
  kernel's window and output axes) and ``G_w``, ``G_b`` the raw gradients:

  .. math::
    \tilde\sigma^2 = \sigma^2 + \epsilon_1 \max(\sigma^2) + \epsilon_2,
    \quad q^2 = \max(n_{in} / N, \sqrt{r s}),

    G_w \leftarrow (G_w - \mu G_b) / \tilde\sigma^2 / q^2,
    \quad G_b \leftarrow G_b / q^2 - \textstyle\sum \mu G_w,

  the sum running over the window and fan-in axes, with the new ``G_w``.
  ``n_in`` is the fan-in size (``k^2 c_in`` for a convolution) and ``r s = 1``
  for a Dense layer, which gives the paper's ``q^2 = max(n_in / N, 1)``.
  Without a bias there is nothing to absorb the centring: the kernel gradient
  is only scaled, ``G_w / \tilde\sigma^2 / q^2``.

  Returns:
    The preconditioned kernel and bias gradients, in their own dtypes.
  """
  dtype = running.mean.dtype
  ndim = kernel_grad.ndim
  shape = _broadcast_shape(ndim, spec.fan_in_axes, running.mean.shape)
  mean = running.mean.reshape(shape)
  variance = running.variance.reshape(shape)
  eps1 = jnp.asarray(eps1, dtype)
  eps2 = jnp.asarray(eps2, dtype)
  regularised = variance + eps1 * jnp.max(running.variance) + eps2
  q_squared = jnp.maximum(
      fan_in_size / batch_size.astype(dtype),
      jnp.sqrt(positions.astype(dtype)),
  )
  inverse = 1 / (regularised * q_squared)
  g_w = kernel_grad.astype(dtype)
  if bias_grad is None:
    return (g_w * inverse).astype(kernel_grad.dtype), None
  output_axes = spec.output_axes(ndim)
  g_b = bias_grad.astype(dtype)
  g_b_wide = g_b.reshape(
      _broadcast_shape(ndim, output_axes, bias_grad.shape)
  )
  new_g_w = (g_w - mean * g_b_wide) * inverse
  reduce_axes = spec.spatial_axes + spec.fan_in_axes
  absorbed = jnp.sum(mean * new_g_w, axis=reduce_axes)
  new_g_b = g_b / q_squared - absorbed.reshape(bias_grad.shape)
  return new_g_w.astype(kernel_grad.dtype), new_g_b.astype(bias_grad.dtype)


def scale_by_bnp(
    *,
    eps1: chex.Numeric = DEFAULT_EPS1,
    eps2: chex.Numeric = DEFAULT_EPS2,
    rho: chex.Numeric = DEFAULT_RHO,
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
    layer_specs: optional ``{layer path: LayerSpec}`` for kernels that are
      not laid out as Flax ``Dense`` (``(n_in, n_out)``) or ``Conv``
      (``(*window, c_in, c_out)``) kernels.

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
      shape = layer.statistics_shape
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
    layers_lib.match_statistics(tree, stats)
    if set(state.running_stats) != set(tree.layers):
      raise ValueError(
          'scale_by_bnp: the optimizer state holds running statistics for '
          f'{sorted(state.running_stats)} but the gradients have layers '
          f'{sorted(tree.layers)}; was the state made for another model?'
      )
    leaves = list(tree.leaves)
    new_running = {}
    for name, layer in tree.layers.items():
      running = state.running_stats[name]
      if running.mean.shape != layer.statistics_shape:
        raise ValueError(
            f'scale_by_bnp: layer {name!r}: the state holds statistics of '
            f'shape {running.mean.shape} but the kernel '
            f'{layer.kernel_shape} needs {layer.statistics_shape}.'
        )
      batch = stats[name]
      running = update_running_stats(running, batch, rho)
      bias_grad = (
          None if layer.bias_index is None else leaves[layer.bias_index]
      )
      new_kernel, new_bias = precondition_layer(
          leaves[layer.kernel_index],
          bias_grad,
          running,
          layer.spec,
          fan_in_size=layer.fan_in_size,
          batch_size=batch.batch_size,
          positions=batch.positions,
          eps1=eps1,
          eps2=eps2,
      )
      leaves[layer.kernel_index] = new_kernel
      if new_bias is not None:
        leaves[layer.bias_index] = new_bias
      new_running[name] = running
    new_updates = jax.tree_util.tree_unflatten(tree.treedef, leaves)
    return new_updates, ScaleByBNPState(
        count=optax.safe_increment(state.count), running_stats=new_running
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
