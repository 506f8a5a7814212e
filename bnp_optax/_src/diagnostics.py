r"""Hessian conditioning diagnostics for one neuron (the paper's Figure 8).

The paper's theory (Section 3.3, Proposition 2; Section 4, Proposition 9)
writes the Hessian of the mini-batch loss with respect to the weights
``w_hat = [b_i, w_i]`` of one neuron (one output channel of a convolution) as

.. math::
  \nabla^2_{\hat w} \mathcal{L} = \hat H^T S \hat H,
  \qquad \hat H = [e, H],

where the rows of ``H`` are the layer's inputs (for a convolution, the
im2col patches, Eq. 18) and ``S`` is the second derivative of the mini-batch
loss with respect to the neuron's pre-activations. BNP's change of variables
``w_hat = P z`` gives the preconditioned Hessian ``P^T (H_hat^T S H_hat) P``
(Theorem 3), whose condition number is smaller by up to about
``kappa(D)^2`` (Theorem 4).

This module computes both Hessians, their condition numbers and
``kappa(D)`` for a Flax linen model and the preconditioner that
:func:`bnp_optax.scale_by_bnp` is using. Linear algebra is done in NumPy
float64: the Hessians of one neuron are small (``n_in + 1`` square) and their
rank is often below their size (``N < n_in + 1``), so the smallest non-zero
singular value must be told apart from rounding.
"""

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import transform


class NeuronHessian(NamedTuple):
  r"""The Hessian of the mini-batch loss for one neuron, and its factors.

  Attributes:
    hessian: ``H_hat^T S H_hat``, shape ``(n + 1, n + 1)``, float64, with the
      bias first and then the neuron's kernel entries in the kernel's own
      order (``kernel[..., i].ravel()``: window positions, then input
      channels, for a Flax ``Conv``).
    inputs: ``H``, shape ``(M, n)``: one row per example (Dense) or per
      example and output position (Conv, ``M = N r s``, Eq. 18).
    curvature: ``S``, shape ``(M, M)``: the second derivative of the
      mini-batch loss with respect to the neuron's ``M`` pre-activations. It
      is diagonal (``(1/N) L''``, Proposition 2) when the loss is a mean of
      per-example losses and the neuron is a Dense one; for a convolution it
      is block diagonal with ``r s`` blocks (Proposition 9).
  """

  hessian: np.ndarray
  inputs: np.ndarray
  curvature: np.ndarray


class Conditioning(NamedTuple):
  r"""Condition numbers of a neuron's Hessian before and after BNP.

  Attributes:
    kappa_hessian: ``kappa(H_hat^T S H_hat)``.
    kappa_preconditioned: ``kappa(P^T H_hat^T S H_hat P)``.
    kappa_d: ``kappa(D)`` with ``D = diag(1, 1 / sigma~)``, the scaling part
      of ``P = U D`` (Eq. 12).
    rank: the numerical rank of the Hessian (the number of singular values
      counted as non-zero); at most ``min(M, n + 1)``.
  """

  kappa_hessian: float
  kappa_preconditioned: float
  kappa_d: float
  rank: int

  @property
  def improvement(self) -> float:
    """``kappa_hessian / kappa_preconditioned``."""
    return self.kappa_hessian / self.kappa_preconditioned


def _float64(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x), dtype=np.float64)


def _singular_values(matrix: Any) -> np.ndarray:
  return np.linalg.svd(_float64(matrix), compute_uv=False)


def _nonzero(sv: np.ndarray, shape: tuple[int, ...], rtol) -> np.ndarray:
  if rtol is None:
    rtol = max(shape) * np.finfo(np.float64).eps
  return sv[sv > rtol * sv[0]] if sv.size and sv[0] > 0 else sv[:0]


def condition_number(matrix: Any, *, rtol: float | None = None) -> float:
  r"""Largest over smallest non-zero singular value, as the paper defines it.

  .. math::
    \kappa(A) = \sigma_{\max}(A) / \sigma_{\min}^{*}(A),

  where ``sigma*_min`` is the smallest singular value above
  ``rtol * sigma_max`` (Section 3.2: the Hessian of a network is singular,
  and gradient descent converges at the rate set by its smallest non-zero
  eigenvalue). Computed in float64.

  Args:
    matrix: a 2-D array.
    rtol: singular values at or below ``rtol * sigma_max`` count as zero;
      default ``max(matrix.shape) * eps(float64)``, as
      ``numpy.linalg.matrix_rank`` does.

  Returns:
    The condition number, a Python float (``nan`` for the zero matrix).

  Example:
    >>> from bnp_optax import diagnostics
    >>> diagnostics.condition_number([[4., 0., 0.], [0., 1., 0.],
    ...                               [0., 0., 0.]])
    4.0

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Section 3.2, Theorem 1).
  """
  a = _float64(matrix)
  if a.ndim != 2:
    raise ValueError(f'condition_number needs a matrix, got shape {a.shape}.')
  sv = _nonzero(_singular_values(a), a.shape, rtol)
  if not sv.size:
    return float('nan')
  return float(sv[0] / sv[-1])


def hessian_from_inputs(inputs: Any, curvature: Any) -> np.ndarray:
  r"""``H_hat^T S H_hat`` with ``H_hat = [e, H]`` (Propositions 2 and 9).

  Args:
    inputs: ``H``, shape ``(M, n)``: the layer inputs (Dense) or the im2col
      patch matrix (Conv), one row per pre-activation of the neuron.
    curvature: ``S``: shape ``(M,)`` for a diagonal ``S`` or ``(M, M)``.

  Returns:
    The ``(n + 1, n + 1)`` Hessian with respect to ``[b_i, w_i]``, float64.

  Example:
    >>> import numpy as np
    >>> from bnp_optax import diagnostics
    >>> h = np.array([[1., 2.], [3., 4.]])
    >>> diagnostics.hessian_from_inputs(h, np.array([0.5, 0.5]))
    array([[ 1.,  2.,  3.],
           [ 2.,  5.,  7.],
           [ 3.,  7., 10.]])

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Proposition 2, Eqs. 10-11; Proposition 9).
  """
  h = _float64(inputs)
  s = _float64(curvature)
  if h.ndim != 2:
    raise ValueError(f'inputs must be (M, n), got shape {h.shape}.')
  h_hat = np.concatenate([np.ones((h.shape[0], 1)), h], axis=1)
  if s.ndim == 1:
    s = np.diag(s)
  if s.shape != (h.shape[0], h.shape[0]):
    raise ValueError(
        f'curvature must be ({h.shape[0]},) or {(h.shape[0],) * 2}, got '
        f'shape {s.shape}.'
    )
  return h_hat.T @ s @ h_hat


def patch_statistics(inputs: Any) -> transform.RunningStats:
  r"""Mean and biased variance of every column of ``H`` (Eqs. 13, 19-20).

  For a Dense layer these are the batch statistics ``mu_H``, ``sigma_H^2``
  (Eq. 13). For a convolution, whose ``H`` is the patch matrix of Eq. 18,
  they are the exact per-kernel-position statistics of Eqs. 19-20, taken over
  the (zero-padded) sub-feature-map each kernel entry sees; the optimizer
  approximates them by the per-channel statistics of the whole feature map
  (Eqs. 21-22), broadcast over the window.

  Args:
    inputs: ``H``, shape ``(M, n)``, e.g. :attr:`NeuronHessian.inputs`.

  Returns:
    A ``RunningStats(mean, variance)`` of two float64 vectors of length
    ``n``.
  """
  h = _float64(inputs)
  mean = h.mean(axis=0)
  variance = np.square(h - mean[None, :]).mean(axis=0)
  return transform.RunningStats(mean=mean, variance=variance)


def _mean_variance(stats: Any) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, variance)`` of an object with those fields, or of a pair."""
  if hasattr(stats, 'mean') and hasattr(stats, 'variance'):
    mean, variance = stats.mean, stats.variance
  else:
    mean, variance = stats
  return _float64(mean).reshape(-1), _float64(variance).reshape(-1)


def _fan_in_vectors(stats: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of length ``size``: per-channel ones are broadcast."""
  mean, variance = _mean_variance(stats)
  channels = mean.shape[0]
  if size % channels:
    raise ValueError(
        f'statistics of length {channels} do not divide the {size} kernel '
        'entries of the neuron.'
    )
  window = size // channels
  # Flax kernels are (*window, c_in, c_out): channels vary fastest.
  tile = lambda v: np.broadcast_to(v[None, :], (window, channels)).reshape(-1)
  return tile(mean), tile(variance)


def _regularised_sigma(variance: np.ndarray, eps1, eps2) -> np.ndarray:
  sigma2 = variance + eps1 * np.max(variance) + eps2
  return np.sqrt(sigma2)


def preconditioner(
    stats: Any,
    *,
    size: int | None = None,
    eps1: float = transform.DEFAULT_EPS1,
    eps2: float = transform.DEFAULT_EPS2,
) -> np.ndarray:
  r"""BNP's ``P = U D`` for one neuron (Eqs. 12, 15 and 23).

  .. math::
    P = \begin{bmatrix} 1 & -\mu^T \\ 0 & I \end{bmatrix}
        \begin{bmatrix} 1 & 0 \\ 0 & \mathrm{diag}(1/\tilde\sigma)
        \end{bmatrix},
    \qquad \tilde\sigma^2 = \sigma^2 + \epsilon_1 \max(\sigma^2)
    + \epsilon_2.

  :func:`bnp_optax.scale_by_bnp` multiplies a layer's gradient by
  ``(1/q^2) P P^T`` with the running statistics; the factor ``1/q`` is left
  out here because it does not change condition numbers. With
  ``eps1 = eps2 = 0`` and the batch statistics this is the ``P`` of the
  theory (Theorem 3).

  Args:
    stats: ``(mean, variance)``, e.g. a :class:`~bnp_optax.RunningStats`
      from the optimizer state, a :class:`~bnp_optax.LayerStats`, or the
      result of :func:`patch_statistics`. Per-channel statistics of a
      convolution are broadcast over the kernel window.
    size: the number of kernel entries ``n`` of the neuron (``k^2 c_in`` for
      a 2-D convolution); default: the length of ``mean``.
    eps1: relative regulariser of the variance.
    eps2: absolute regulariser of the variance.

  Returns:
    ``P``, shape ``(n + 1, n + 1)``, float64, ordered bias first.

  Example:
    >>> import numpy as np
    >>> from bnp_optax import diagnostics
    >>> p = diagnostics.preconditioner((np.array([2.]), np.array([4.])),
    ...                                eps1=0., eps2=0.)
    >>> p
    array([[ 1. , -1. ],
           [ 0. ,  0.5]])

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Eqs. 12, 15 and 23; Theorem 3).
  """
  size = _mean_variance(stats)[0].size if size is None else size
  mean, variance = _fan_in_vectors(stats, size)
  sigma = _regularised_sigma(variance, eps1, eps2)
  u = np.eye(size + 1)
  u[0, 1:] = -mean
  d = np.diag(np.concatenate([[1.0], 1.0 / sigma]))
  return u @ d


def kappa_d(
    stats: Any,
    *,
    eps1: float = transform.DEFAULT_EPS1,
    eps2: float = transform.DEFAULT_EPS2,
) -> float:
  r"""``kappa(D)`` for ``D = diag(1, 1/sigma~)`` (Eq. 12, Theorem 4).

  Theorem 4 and the discussion after it bound the improvement of the
  Hessian's condition number by about ``kappa(D)^2``.

  Args:
    stats: ``(mean, variance)``, as for :func:`preconditioner`.
    eps1: relative regulariser of the variance.
    eps2: absolute regulariser of the variance.

  Returns:
    ``max(d) / min(d)`` over the diagonal ``d`` of ``D``.

  Example:
    >>> import numpy as np
    >>> from bnp_optax import diagnostics
    >>> diagnostics.kappa_d((np.zeros(2), np.array([4., 0.01])),
    ...                     eps1=0., eps2=0.)  # d = (1, 1/2, 10)
    20.0

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Theorem 4 and Section 5.1).
  """
  _, variance = _mean_variance(stats)
  d = np.concatenate([[1.0], 1.0 / _regularised_sigma(variance, eps1, eps2)])
  return float(d.max() / d.min())


def conditioning(
    hessian: Any,
    stats: Any,
    *,
    eps1: float = transform.DEFAULT_EPS1,
    eps2: float = transform.DEFAULT_EPS2,
    rtol: float | None = None,
) -> Conditioning:
  r"""Condition numbers of a neuron's Hessian with and without BNP.

  .. math::
    \kappa(\hat H^T S \hat H), \quad
    \kappa(P^T \hat H^T S \hat H P), \quad \kappa(D).

  Theorem 4: the ratio of the first two can be as large as about
  ``kappa(D)^2`` when the input features have very different variances.

  Args:
    hessian: the ``(n + 1, n + 1)`` Hessian, e.g.
      :attr:`NeuronHessian.hessian`.
    stats: ``(mean, variance)`` giving ``P``, as for :func:`preconditioner`:
      the optimizer's running statistics of the layer
      (``opt_state.running_stats[layer]``), or :func:`patch_statistics` for
      the exact batch statistics. (With ``scale_by_bnp(debias=True)`` the
      optimizer preconditions with debiased averages, which the state does
      not hold; the plain ones give a slightly different ``P`` in the first
      few hundred steps.)
    eps1: relative regulariser, as given to ``scale_by_bnp``.
    eps2: absolute regulariser, as given to ``scale_by_bnp``.
    rtol: see :func:`condition_number`.

  Returns:
    A :class:`Conditioning`.

  Example:
    >>> import numpy as np
    >>> from bnp_optax import diagnostics
    >>> rng = np.random.default_rng(0)
    >>> h = rng.normal(size=(50, 3)) * np.array([1., 10., 100.]) + 5.
    >>> hess = diagnostics.hessian_from_inputs(h, np.full(50, 1 / 50))
    >>> c = diagnostics.conditioning(hess, diagnostics.patch_statistics(h),
    ...                              eps1=0., eps2=0.)
    >>> bool(c.kappa_hessian > 1e4 and c.kappa_preconditioned < 3)
    True

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Theorems 3-4; Section 5.1, Figure 8).
  """
  hess = _float64(hessian)
  size = hess.shape[0] - 1
  p = preconditioner(stats, size=size, eps1=eps1, eps2=eps2)
  sv = _nonzero(_singular_values(hess), hess.shape, rtol)
  return Conditioning(
      kappa_hessian=condition_number(hess, rtol=rtol),
      kappa_preconditioned=condition_number(p.T @ hess @ p, rtol=rtol),
      kappa_d=kappa_d(stats, eps1=eps1, eps2=eps2),
      rank=int(sv.size),
  )


def conv_mean_error_bound(
    kernel_size: int, height: int, width: int, max_abs: float
) -> float:
  r"""Proposition 10's bound on ``|mu(t, a, p) - mu(p)|``.

  .. math::
    (k - 1) \Big(\frac{1}{2r} + \frac{1}{2s} - \frac{k - 1}{4 r s}\Big)
    \max_{u, v, i} |h^{(i)}(u, v, p)|,

  for a stride-1 SAME convolution with a ``k x k`` kernel on ``r x s``
  feature maps: the error of the per-channel mean (Eq. 21) used by the
  optimizer against the exact per-kernel-position mean (Eq. 19).

  Args:
    kernel_size: ``k``, odd.
    height: ``r``.
    width: ``s``.
    max_abs: the largest absolute value in the channel's feature maps.

  Returns:
    The bound.

  Example:
    >>> from bnp_optax import diagnostics
    >>> diagnostics.conv_mean_error_bound(3, 32, 32, 1.0)
    0.0615234375

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Section 4, Proposition 10).
  """
  k, r, s = kernel_size, height, width
  return (k - 1) * (1 / (2 * r) + 1 / (2 * s) - (k - 1) / (4 * r * s)) * max_abs


# ----------------------------------------------------------------- linen --


def _module_path(module: nn.Module) -> str:
  return layers_lib.path_to_str(tuple(module.path))


def _is_target(context, layer: str) -> bool:
  return (
      context.method_name == '__call__'
      and isinstance(context.module, (nn.Dense, nn.Conv))
      and _module_path(context.module) == layer
  )


def _capture_layer(model, variables, x, layer, apply_kwargs):
  """Runs the model once; returns the target module (unbound) and input."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if _is_target(context, layer):
      inputs = args[0] if args else kwargs['inputs']
      calls.append((context.module.clone(parent=None), inputs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, **apply_kwargs)
  if not calls:
    raise ValueError(
        f'no nn.Dense or nn.Conv layer {layer!r} was called; layer paths '
        'look like the keys of bnp_optax.describe_coverage(params), without '
        "'/kernel'."
    )
  if len(calls) > 1:
    raise NotImplementedError(
        f'layer {layer!r} is called {len(calls)} times in one forward pass; '
        'the diagnostics handle layers called once.'
    )
  return calls[0]


def _layer_params(variables, layer: str) -> dict:
  node = variables['params']
  for key in layer.split('/'):
    node = node[key]
  return node


def _input_matrix(module, params, inputs, neuron: int) -> jax.Array:
  """``H``: the Jacobian of the neuron's pre-activations w.r.t. its kernel."""
  kernel = params['kernel']
  if isinstance(module, nn.Dense):
    return inputs.reshape(-1, inputs.shape[-1])

  def channel(k_column):
    k = kernel.at[..., neuron].set(k_column.reshape(kernel.shape[:-1]))
    p = {'kernel': k}
    if 'bias' in params:
      p['bias'] = jnp.zeros_like(params['bias'])
    return module.apply({'params': p}, inputs)[..., neuron].reshape(-1)

  column = kernel[..., neuron].reshape(-1)
  # Linear in the kernel: the Jacobian at any point is the patch matrix.
  return jax.jacfwd(channel)(column)


def _hessian_factors(model, layer, neuron, apply_kwargs):
  """``(variables, x, loss) -> (H, S)``, to be jitted."""

  def factors(variables, x, loss):
    module, inputs = _capture_layer(model, variables, x, layer, apply_kwargs)
    params = _layer_params(variables, layer)
    h = _input_matrix(module, params, inputs, neuron)

    def perturbed_loss(delta):
      def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_target(context, layer):
          out = out.at[..., neuron].add(delta.astype(out.dtype))
        return out

      with nn.intercept_methods(interceptor):
        return loss(model.apply(variables, x, **apply_kwargs))

    out_shape = jax.eval_shape(
        lambda: module.apply({'params': params}, inputs)
    ).shape
    delta = jnp.zeros(out_shape[:-1], inputs.dtype)
    m = math.prod(out_shape[:-1])
    s = jax.hessian(perturbed_loss)(delta).reshape(m, m)
    return h, s

  return factors


_CACHE_SIZE = 16
_jit_cache: dict[tuple[Any, ...], tuple[Any, Callable[..., Any]]] = {}


def _cached_factors(model, layer, neuron, apply_kwargs):
  """Jitted :func:`_hessian_factors`, reused across calls for one model."""
  if apply_kwargs:
    return jax.jit(_hessian_factors(model, layer, neuron, apply_kwargs))
  key = (id(model), layer, neuron)
  entry = _jit_cache.get(key)
  if entry is not None and entry[0] is model:
    return entry[1]
  fn = jax.jit(_hessian_factors(model, layer, neuron, {}))
  if len(_jit_cache) >= _CACHE_SIZE:
    _jit_cache.pop(next(iter(_jit_cache)))
  _jit_cache[key] = (model, fn)  # holds the model, so its id stays unique
  return fn


def _as_partial(loss_fn) -> jax.tree_util.Partial:
  if isinstance(loss_fn, jax.tree_util.Partial):
    return loss_fn
  return jax.tree_util.Partial(loss_fn)


def neuron_hessian(
    model: nn.Module,
    variables: Any,
    x: Any,
    loss_fn: Callable[[Any], jax.Array],
    *,
    layer: str,
    neuron: int = 0,
    **apply_kwargs: Any,
) -> NeuronHessian:
  r"""Hessian of the mini-batch loss w.r.t. one neuron's ``[b_i, w_i]``.

  Computed as the paper writes it, ``H_hat^T S H_hat`` (Proposition 2 for a
  Dense layer, Proposition 9 for a convolution's output channel): ``H`` is
  the layer's input (for a convolution, the patch matrix of Eq. 18, here
  the exact Jacobian of the channel's output with respect to its kernel, so
  any padding, stride or dilation is handled), and ``S`` is the Hessian of
  the loss with respect to the neuron's pre-activations, by automatic
  differentiation through the rest of the network. For softmax
  cross-entropy averaged over ``N`` examples and a neuron of the output
  layer, ``S = diag(p_i (1 - p_i)) / N``.

  The computation is jitted and the compiled function is reused for the same
  ``model``, ``layer`` and ``neuron`` when ``loss_fn`` is the same function
  or a ``jax.tree_util.Partial`` of the same function (pass the labels that
  way, ``Partial(my_loss, labels=y)``, to avoid a compilation per batch).

  Args:
    model: a Flax linen model.
    variables: its variables (``{'params': ...}``).
    x: the mini-batch input.
    loss_fn: maps the model output to the scalar mini-batch loss (close over
      the labels, or bind them with ``jax.tree_util.Partial``).
    layer: the path of an ``nn.Dense`` or ``nn.Conv`` layer, as in the
      parameters (``'Dense_2'``, ``'Block_0/Conv_1'``), called once in the
      forward pass.
    neuron: the output feature (channel) ``i``.
    **apply_kwargs: passed on to ``model.apply``.

  Returns:
    A :class:`NeuronHessian`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> from bnp_optax import diagnostics
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
    >>> x = jax.random.normal(jax.random.key(0), (8, 2))
    >>> y = jnp.arange(8) % 3
    >>> variables = model.init(jax.random.key(1), x)
    >>> loss = lambda logits: jnp.mean(
    ...     optax.softmax_cross_entropy_with_integer_labels(logits, y))
    >>> nh = diagnostics.neuron_hessian(model, variables, x, loss,
    ...                                 layer='layers_2', neuron=0)
    >>> nh.hessian.shape, nh.inputs.shape, nh.curvature.shape
    ((5, 5), (8, 4), (8, 8))

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Propositions 2 and 9).
  """
  fn = _cached_factors(model, layer, neuron, apply_kwargs)
  h, s = fn(variables, x, _as_partial(loss_fn))
  return NeuronHessian(
      hessian=hessian_from_inputs(h, s),
      inputs=_float64(h),
      curvature=_float64(s),
  )


def neuron_hessian_autodiff(
    model: nn.Module,
    variables: Any,
    x: Any,
    loss_fn: Callable[[Any], jax.Array],
    *,
    layer: str,
    neuron: int = 0,
    **apply_kwargs: Any,
) -> np.ndarray:
  r"""The same Hessian as :func:`neuron_hessian`, by ``jax.hessian``.

  Differentiates the mini-batch loss twice with respect to the vector
  ``[b_i, vec(kernel[..., i])]`` directly, as a reference for
  :func:`neuron_hessian` (they agree to rounding, which the tests check).

  Args:
    model: a Flax linen model.
    variables: its variables.
    x: the mini-batch input.
    loss_fn: maps the model output to the scalar mini-batch loss.
    layer: the layer's path.
    neuron: the output feature (channel) ``i``.
    **apply_kwargs: passed on to ``model.apply``.

  Returns:
    The ``(n + 1, n + 1)`` Hessian, float64, ordered as in
    :attr:`NeuronHessian.hessian`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import flax.linen as nn
    >>> from bnp_optax import diagnostics
    >>> model = nn.Sequential([nn.Dense(3), jnp.tanh, nn.Dense(2)])
    >>> x = jax.random.normal(jax.random.key(0), (5, 2))
    >>> variables = model.init(jax.random.key(1), x)
    >>> loss = lambda out: jnp.mean(out ** 2)
    >>> a = diagnostics.neuron_hessian(model, variables, x, loss,
    ...                                layer='layers_0', neuron=1).hessian
    >>> b = diagnostics.neuron_hessian_autodiff(model, variables, x, loss,
    ...                                         layer='layers_0', neuron=1)
    >>> bool(np.allclose(a, b, rtol=1e-4, atol=1e-6))
    True
  """
  params = _layer_params(variables, layer)
  kernel = params['kernel']
  if 'bias' not in params:
    raise ValueError(f'layer {layer!r} has no bias.')
  keys = layer.split('/')

  def set_layer(tree, depth, new):
    tree = dict(tree)
    key = keys[depth]
    tree[key] = new if depth == len(keys) - 1 else set_layer(
        tree[key], depth + 1, new
    )
    return tree

  def loss_of(w_hat):
    new = dict(params)
    new['bias'] = params['bias'].at[neuron].set(w_hat[0])
    new['kernel'] = kernel.at[..., neuron].set(
        w_hat[1:].reshape(kernel.shape[:-1])
    )
    new_vars = dict(variables)
    new_vars['params'] = set_layer(variables['params'], 0, new)
    return loss_fn(model.apply(new_vars, x, **apply_kwargs))

  w_hat = jnp.concatenate(
      [params['bias'][neuron][None], kernel[..., neuron].reshape(-1)]
  )
  return _float64(jax.jit(jax.hessian(loss_of))(w_hat))
