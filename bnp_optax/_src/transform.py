"""The BNP gradient transformation (Lange, Helfrich & Ye, Algorithms 2-3)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import layout
from bnp_optax._src import statistics

# The paper's defaults (Algorithm 2).
DEFAULT_EPS1 = 1e-2
DEFAULT_EPS2 = 1e-4
DEFAULT_RHO = 0.99


class _NotParameters:
  """Marks state that ``optax.tree.map_params`` must not map ``f`` over."""

  def __repr__(self):
    return 'NOT_PARAMETERS'


# A pytree leaf (an unregistered object), so map_params hands the whole
# subtree it stands for to transform_non_params.
NOT_PARAMETERS = _NotParameters()


def is_params_placeholder(params: Any) -> bool:
  """Whether ``init`` is called by ``optax.tree.map_params``.

  ``map_params`` calls ``init`` with a placeholder, to find where the state
  holds copies of the parameter tree. BNP's running statistics are not such
  copies (one fan-in vector pair per layer), so for the placeholder ``init``
  marks them with :data:`NOT_PARAMETERS`: ``f`` never sees them and
  ``transform_non_params``, if given, receives the whole
  ``{layer: RunningStats}`` dict. ``optax.masked`` detects the placeholder
  the same way.
  """
  return type(params).__name__ == '_ParamsPlaceholder' and (
      type(params).__module__.startswith('optax'))


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


MISSING_LAYER_STATS = (
    'scale_by_bnp: update() needs the keyword argument layer_stats, the '
    'input statistics of every Dense/Conv layer from this forward pass, and '
    'got none. Get them with `output, layer_stats = bnp_optax.linen.apply('
    'model, variables, x)` (bnp_optax.nnx.apply(model, x) for NNX, '
    'bnp_optax.tracing.apply(fn, params, x) for Equinox, Haiku or plain JAX '
    'functions) and pass them '
    'on: `tx.update(grads, opt_state, params, layer_stats=layer_stats)`. '
    "Flax's own flax.training.train_state.TrainState.apply_gradients drops "
    'them: use bnp_optax.linen.TrainState, whose apply_gradients(grads=..., '
    'layer_stats=...) forwards them; with NNX, call '
    '`optimizer.update(model, grads, layer_stats=layer_stats)`. '
    "optax.MultiSteps forwards only the last micro-step's: use "
    'bnp_optax.multi_steps.'
)


def _concrete_value(value: Any) -> np.ndarray | None:
  """``value`` as a NumPy array, or ``None`` when it is only known at run time.

  Python and NumPy numbers (and concrete JAX arrays) are read without
  creating a JAX operation, so the check also runs inside ``jax.jit`` or
  ``jax.eval_shape`` (e.g. an optimizer built in a jitted
  ``create_train_state``), where any ``jnp`` operation would be traced.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None


def _check_hyperparameters(eps1, eps2, rho) -> None:
  """Rejects invalid values that are known now; traced ones are clipped later.

  Raises:
    ValueError: naming the argument, for a negative or non-finite ``eps1`` or
      ``eps2``, or a ``rho`` outside ``[0, 1)``.
  """
  for name, value in (('eps1', eps1), ('eps2', eps2)):
    v = _concrete_value(value)
    if v is not None and not np.all(np.isfinite(v)):
      raise ValueError(f'scale_by_bnp: {name} must be finite, got {value}.')
    if v is not None and not np.all(v >= 0):
      raise ValueError(f'scale_by_bnp: {name} must be >= 0, got {value}.')
  v = _concrete_value(rho)
  if v is not None and not np.all((v >= 0) & (v < 1)):
    raise ValueError(f'scale_by_bnp: rho must be in [0, 1), got {rho}.')


def clip_hyperparameters(eps1, eps2, rho, dtype):
  """The run-time rule for values that could not be checked when built.

  Values set through ``optax.inject_hyperparams`` (or otherwise traced) are
  only known inside the step. Rather than let a bad one corrupt the running
  statistics, they are clipped into the valid range: ``rho`` into
  ``[0, 1]`` (``rho = 1`` freezes the statistics, ``rho > 1`` would
  extrapolate them to negative variances), ``eps1`` and ``eps2`` to
  ``>= 0``. A NaN ``rho`` freezes the statistics for the step (``1``), a NaN
  ``eps`` counts as ``0``. Valid values pass unchanged.

  Returns:
    ``(eps1, eps2, rho)`` as arrays of ``dtype``.
  """
  def clipped(value, low, high, if_nan):
    value = jnp.asarray(value, dtype)
    return jnp.where(jnp.isnan(value), if_nan, jnp.clip(value, low, high))

  return (clipped(eps1, 0, None, 0), clipped(eps2, 0, None, 0),
          clipped(rho, 0, 1, 1))


def _clipped_once(cache: dict, eps1, eps2, rho, dtype):
  """:func:`clip_hyperparameters` once per dtype, not once per layer."""
  dtype = jnp.dtype(dtype)
  if dtype not in cache:
    cache[dtype] = clip_hyperparameters(eps1, eps2, rho, dtype)
  return cache[dtype]


def batch_variance(
    batch: statistics.LayerStats, running_mean: jax.Array
) -> jax.Array:
  """The batch variance that step 2 averages in: the batch-size-1 rule.

  When the batch statistics summarise a single value per feature
  (``count == 1``: a Dense layer at batch size 1), the batch variance is
  meaningless; as the paper suggests (end of Sec. 3.3), it is replaced by the
  squared deviation of that value from the running mean *before* this step's
  update, ``(h - mu_old)^2``: the previous estimate, which has not yet seen
  ``h``. (A Conv layer at batch size 1 still has ``r * s`` values per channel
  and uses their variance, Eq. 22.)

  Args:
    batch: this step's batch statistics.
    running_mean: the running mean before this step.

  Returns:
    ``sigma_H^2``, in the dtype of ``running_mean``.
  """
  dtype = running_mean.dtype
  variance = batch.variance.astype(dtype)
  deviation = jnp.square(batch.mean.astype(dtype) - running_mean)
  return jnp.where(batch.count == 1, variance + deviation, variance)


def update_running_stats(
    running: RunningStats,
    batch: statistics.LayerStats,
    rho: ArrayLike,
) -> RunningStats:
  """Step 2 of Algorithms 2-3, with the batch-size-1 rule and a finite guard.

  ``mu <- rho mu + (1 - rho) mu_H`` and
  ``sigma^2 <- rho sigma^2 + (1 - rho) sigma_H^2``, with ``sigma_H^2`` from
  :func:`batch_variance`. Where a feature's batch statistics are not finite,
  its running statistics are left unchanged, so one bad batch cannot poison
  them.

  Args:
    running: the running statistics before this step.
    batch: this step's batch statistics.
    rho: the decay of the running averages, in ``[0, 1]``.

  Returns:
    The running statistics after this step.
  """
  dtype = running.mean.dtype
  batch_mean = batch.mean.astype(dtype)
  batch_var = batch_variance(batch, running.mean)
  rho = jnp.asarray(rho, dtype)
  mean = rho * running.mean + (1 - rho) * batch_mean
  variance = rho * running.variance + (1 - rho) * batch_var
  # Per feature, so the guard fuses into the update (no reduction).
  finite = jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
  return RunningStats(
      mean=jnp.where(finite, mean, running.mean),
      variance=jnp.where(finite, variance, running.variance),
  )


def regularised_variance(
    variance: ArrayLike,
    eps1: ArrayLike,
    eps2: ArrayLike,
    *,
    fan_in_axes: tuple[int, ...] | None = None,
) -> ArrayLike:
  r"""Step 3 of Algorithms 2-3: :math:`\tilde\sigma^2`.

  .. math::
    \tilde\sigma^2 = \sigma^2 + \epsilon_1 \max(\sigma^2) + \epsilon_2,

  the maximum taken over one output unit's inputs (``fan_in_axes`` of
  ``variance``, all of them by default; the other axes index independent
  layers). Written with array methods only, so that NumPy float64 input
  (the diagnostics) stays NumPy float64 and JAX input stays in its dtype.

  Args:
    variance: running variances ``sigma^2``.
    eps1: relative regulariser.
    eps2: absolute regulariser.
    fan_in_axes: the axes of ``variance`` the maximum runs over.

  Returns:
    ``sigma~^2``, shaped like ``variance``.
  """
  largest = variance.max(axis=fan_in_axes, keepdims=True)
  return variance + eps1 * largest + eps2


def q_squared(
    fan_in_size: int | jax.Array,
    batch_size: jax.Array,
    positions: jax.Array,
    dtype=jnp.float32,
) -> jax.Array:
  r"""The scaling :math:`q^2 = \max(n_{in} / N, \sqrt{r s})` (Sec. 3.3, 4).

  ``n_in`` is the number of inputs of one output unit (``k^2 c_in`` for a
  convolution), ``N`` the batch size and ``r s`` the number of output
  positions per example (``1`` for a Dense layer, giving the paper's
  ``max(n_in / N, 1)``).

  Returns:
    ``q^2`` as a scalar of ``dtype``.
  """
  return jnp.maximum(
      jnp.asarray(fan_in_size, dtype) / jnp.asarray(batch_size, dtype),
      jnp.sqrt(jnp.asarray(positions, dtype)),
  )


def debiased(
    running: RunningStats, rho: ArrayLike, count: jax.Array
) -> RunningStats:
  r"""Removes the pull of the initial ``mu = 0, sigma^2 = 1`` (as Adam does).

  After ``t`` updates the running averages are
  ``rho^t init + (1 - rho) sum_k rho^(t-k) x_k``; the estimate
  ``(running - rho^t init) / (1 - rho^t)`` weights the observations alone.
  """
  dtype = running.mean.dtype
  decay = jnp.asarray(rho, dtype) ** count.astype(dtype)
  weight = 1 - decay
  # rho = 1 (clipped into range at run time) never moves the averages off
  # their initial values: nothing to debias, and no 0 / 0.
  moved = weight > 0
  safe = jnp.where(moved, weight, 1)
  return RunningStats(
      mean=jnp.where(moved, running.mean / safe, running.mean),
      variance=jnp.where(
          moved, jnp.maximum((running.variance - decay) / safe, 0),
          running.variance),
  )


def _absorbed_sum(
    view: layout.KernelView, scaled_mean: jax.Array, g_w: jax.Array
) -> jax.Array:
  """``sum_{window, fan-in} (mu / s) G_w``, indexed like the bias.

  A fused multiply-and-reduce over the window and fan-in axes. For
  convolutions: XLA:CPU emits a convolution's kernel gradient in
  ``(c_in, *window, c_out)`` order, and the contraction ``c,abcd->d`` made it
  copy that gradient into the kernel's layout and then sum the window in a
  reduction several times slower than the copy; the fused reduction reads
  the gradient once, where it lies. For Dense layers the contraction is a
  matrix-vector product, which XLA:CPU compiles anew for every layer (an
  LLVM kernel each), where identical fusions of same-shape layers share one
  kernel, so a deep MLP's compile time grew with its depth. The timings are
  in ``benchmarks/RESULTS.md``, "Timings behind the library's choices" and
  "Compile time against depth".
  """
  kept = sorted(view.bias_axes)
  summed = tuple(a for a in range(len(view.shape)) if a not in kept)
  product = view.place(scaled_mean, view.statistics_axes) * g_w
  return jnp.transpose(jnp.sum(product, axis=summed),
                       [kept.index(a) for a in view.bias_axes])


def precondition_layer(
    kernel_grad: jax.Array,
    bias_grad: jax.Array | None,
    running: RunningStats,
    spec: layout.LayerSpec,
    *,
    batch_size: jax.Array,
    positions: jax.Array,
    eps1: ArrayLike,
    eps2: ArrayLike,
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
  The maximum is taken over each output unit's inputs: over the layer's
  fan-in, per group for a grouped convolution and per slice along
  independent axes. Without a bias there is nothing to absorb the centring:
  the kernel gradient is only scaled, ``G_w / \tilde\sigma^2 / q^2``.

  Returns:
    The preconditioned kernel and bias gradients, in their own dtypes.
  """
  dtype = running.mean.dtype
  kernel_shape = kernel_grad.shape
  view = layout.kernel_view(spec, kernel_shape)
  mean = view.reshape_statistics(running.mean)
  variance = view.reshape_statistics(running.variance)
  fan_in_dims = tuple(
      range(len(view.independent), len(view.statistics_axes)))
  regularised = regularised_variance(
      variance, eps1, eps2, fan_in_axes=fan_in_dims)
  q2 = q_squared(spec.fan_in_size(kernel_shape), batch_size, positions, dtype)
  # Only a regulariser of zero on an input that never varied reaches the
  # floor; it keeps the update finite (the paper's 1/sigma~^2 would be inf).
  inverse_stats = 1 / jnp.maximum(regularised * q2, jnp.finfo(dtype).eps)
  inverse = view.place(inverse_stats, view.statistics_axes)
  g_w = kernel_grad.astype(dtype).reshape(view.shape)
  if bias_grad is None:
    new_g_w = g_w * inverse
    return new_g_w.reshape(kernel_shape).astype(kernel_grad.dtype), None
  g_b = bias_grad.astype(dtype).reshape(
      tuple(view.shape[a] for a in view.bias_axes))
  new_g_w = (g_w - view.place(mean, view.statistics_axes)
             * view.place(g_b, view.bias_axes)) * inverse
  # sum_{window, fan-in} mu G_w' without a kernel-sized temporary:
  # G_w' = (G_w - mu G_b) / s, so the sum is
  # sum mu/s G_w  -  G_b |window| sum_{fan-in} mu^2/s, a contraction.
  scaled_mean = mean * inverse_stats
  absorbed = _absorbed_sum(view, scaled_mean, g_w)
  mean_square = view.window_size * jnp.sum(
      mean * scaled_mean, axis=fan_in_dims)
  absorbed = absorbed - mean_square.reshape(
      mean_square.shape + (1,) * len(view.outputs)) * g_b
  new_g_b = g_b / q2 - absorbed
  return (
      new_g_w.reshape(kernel_shape).astype(kernel_grad.dtype),
      new_g_b.reshape(bias_grad.shape).astype(bias_grad.dtype),
  )


def graft_layer(
    raw: tuple[jax.Array, ...],
    preconditioned: tuple[jax.Array, ...],
    dtype,
) -> tuple[jax.Array, ...]:
  r"""Grafting, not in the paper: BNP's direction, SGD's size.

  Grafting (Agarwal et al., 2020) takes each layer's step direction from
  one method and its size from another. Here the direction is BNP's
  preconditioned gradient and the size that of the layer's raw gradient,
  kernel and bias together:

  .. math::
    (G_w, G_b) \leftarrow (G_w, G_b) \,
      \frac{\lVert (G_w^{raw}, G_b^{raw}) \rVert}
           {\lVert (G_w, G_b) \rVert},

  so the layer's step is as long as SGD's at the same learning rate (and a
  learning rate tuned for SGD carries over), while the preconditioning still
  decides how it is shared between the weights and the bias.
  ``docs/howto/learning_rate.md`` compares this with other ways of matching
  the size. A zero preconditioned gradient stays zero (no ``0 / 0``).

  Args:
    raw: the layer's raw gradients (kernel, and bias if any).
    preconditioned: the same, preconditioned by BNP.
    dtype: the dtype the norms are computed in (the statistics' dtype).

  Returns:
    ``preconditioned`` rescaled, each leaf in its own dtype.
  """
  def norm(leaves):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(dtype)))
                        for leaf in leaves))

  raw_norm, new_norm = norm(raw), norm(preconditioned)
  scale = raw_norm / jnp.where(new_norm > 0, new_norm, 1)
  return tuple((leaf.astype(dtype) * scale).astype(leaf.dtype)
               for leaf in preconditioned)


def _graft_mode(graft):
  """``None`` (off), ``True``, or the traced flag to select with at run time.

  A Python or NumPy boolean decides when the transformation is built (off:
  no operation at all, the paper's update bit for bit); a traced one
  (``optax.inject_hyperparams``) selects each step.
  """
  value = _concrete_value(graft)
  if value is None:
    return graft
  return True if bool(value) else None


def _grafted(raw, preconditioned, dtype, graft):
  """graft_layer on ``(kernel, bias or None)``; ``graft`` traced or True.

  ``graft=None`` (off) returns ``preconditioned`` unchanged.
  """
  if graft is None:
    return preconditioned
  present = tuple(i for i, leaf in enumerate(preconditioned)
                  if leaf is not None)
  grafted = graft_layer(tuple(raw[i] for i in present),
                        tuple(preconditioned[i] for i in present), dtype)
  if graft is not True:
    grafted = tuple(jnp.where(graft, new, preconditioned[i])
                    for new, i in zip(grafted, present))
  out = list(preconditioned)
  for new, i in zip(grafted, present):
    out[i] = new
  return tuple(out)


def scale_by_bnp(
    *,
    eps1: ArrayLike = DEFAULT_EPS1,
    eps2: ArrayLike = DEFAULT_EPS2,
    rho: ArrayLike = DEFAULT_RHO,
    debias: bool = False,
    graft: bool | ArrayLike = False,
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
    eps1: relative regulariser of the variance, finite and ``>= 0``.
    eps2: absolute regulariser of the variance, finite and ``>= 0``.
    rho: decay of the running averages, in ``[0, 1)``; ``0`` uses the batch
      statistics alone. Values known when the transformation is built
      (Python or NumPy numbers, also inside ``jax.jit``/``jax.eval_shape``)
      are checked then and a bad one raises ``ValueError``; values that are
      only known at run time (``optax.inject_hyperparams``) are clipped into
      range each step (``rho`` into ``[0, 1]``, ``eps1``, ``eps2`` to
      ``>= 0``), and ``1 / (sigma~^2 q^2)`` is capped at ``1 / machine
      epsilon`` so that ``eps1 = eps2 = 0`` on an input that never varies
      still gives finite updates.
    debias: not in the paper, off by default. When true, the statistics used
      to precondition are the running averages with the pull of their initial
      values removed, ``(avg - rho^t init) / (1 - rho^t)`` after ``t`` steps,
      as Adam debiases its moments; the state still holds the plain averages.
    graft: not in the paper, off by default. When true, each layer's
      preconditioned gradient is rescaled to the norm of the layer's raw
      gradient (kernel and bias together, ``graft_layer``): BNP's
      direction with SGD's step size, so that the learning rate tuned for
      SGD (or the optimizer chained after BNP) carries over. Off, the update
      is the paper's, bit for bit. May be a traced boolean (then both are
      computed and one selected each step).
    layer_specs: optional ``{layer path: LayerSpec}`` for kernels that are
      not laid out as Flax ``Dense`` (``(n_in, n_out)``) or ``Conv``
      (``(*window, c_in, c_out)``) kernels, needed when the optimizer state
      is created (``bnp_optax.linen.layer_specs`` and
      ``bnp_optax.nnx.layer_specs`` compute them for a model); or
      ``{kernel leaf path: LeafLayer}`` for any parameter pytree, as
      ``bnp_optax.tracing.layer_specs`` computes them (Equinox, Haiku,
      plain JAX functions).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword argument ``layer_stats``, ``{layer path: LayerStats}`` as
    ``bnp_optax.linen.apply``, ``bnp_optax.nnx.apply`` and
    ``bnp_optax.tracing.apply`` return it (a tree of ``LayerStats`` nested
    by path is accepted too). Hyperparameters may be traced values, so it
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
  graft = _graft_mode(graft)

  def init_fn(params: optax.Params) -> ScaleByBNPState:
    if is_params_placeholder(params):
      return ScaleByBNPState(
          count=jnp.zeros([], jnp.int32), running_stats=NOT_PARAMETERS)
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
      raise ValueError(MISSING_LAYER_STATS)
    tree = layers_lib.parse_tree(updates, layer_specs)
    stats = layers_lib.flatten_layer_stats(layer_stats)
    passed = layers_lib.not_preconditioned(layer_stats)
    specs = layers_lib.match_statistics(tree, stats, passed)
    if set(state.running_stats) != set(tree.layers):
      raise ValueError(
          'scale_by_bnp: the optimizer state holds running statistics for '
          f'{sorted(state.running_stats)} but the gradients have layers '
          f'{sorted(tree.layers)}; was the state made for another model?'
      )
    count = optax.safe_increment(state.count)
    leaves = list(tree.leaves)
    new_running = {}
    clipped = {}
    for name, layer in tree.layers.items():
      if name not in specs:  # refused by the capture: passed through
        new_running[name] = state.running_stats[name]
        continue
      spec = specs[name]
      running = state.running_stats[name]
      if running.mean.shape != spec.statistics_shape(layer.kernel_shape):
        raise ValueError(layers_lib.state_mismatch_message(
            name, running.mean.shape, spec, layer.kernel_shape))
      batch = stats[name]
      layer_eps1, layer_eps2, layer_rho = _clipped_once(
          clipped, eps1, eps2, rho, running.mean.dtype)
      # A layer that saw no input (inside a scan of length 0) has nothing
      # to estimate: its running statistics and gradient stay unchanged.
      has_data = statistics.has_data(batch)
      running = jax.tree.map(
          lambda new, old, has_data=has_data: jnp.where(has_data, new, old),
          update_running_stats(running, batch, layer_rho), running)
      new_running[name] = running
      if debias:
        running = debiased(running, layer_rho, count)
      bias_grad = (
          None if layer.bias_index is None else leaves[layer.bias_index]
      )
      new_kernel, new_bias = precondition_layer(
          leaves[layer.kernel_index],
          bias_grad,
          running,
          spec,
          batch_size=batch.batch_size,
          positions=batch.positions,
          eps1=layer_eps1,
          eps2=layer_eps2,
      )
      new_kernel, new_bias = _grafted(
          (leaves[layer.kernel_index], bias_grad), (new_kernel, new_bias),
          running.mean.dtype, graft)
      leaves[layer.kernel_index] = jnp.where(
          has_data, new_kernel, leaves[layer.kernel_index])
      if new_bias is not None:
        leaves[layer.bias_index] = jnp.where(
            has_data, new_bias, leaves[layer.bias_index])
    new_updates = jax.tree_util.tree_unflatten(tree.treedef, leaves)
    return new_updates, ScaleByBNPState(
        count=count, running_stats=new_running
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
