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

This module holds the theory, framework free: the Hessian from its factors,
condition numbers, ``kappa(D)``, the preconditioner that
:func:`bnp_optax.scale_by_bnp` is using, and Proposition 10's bound for
convolutions. ``linen_hessian`` finds the factors of a Flax linen model. Linear
algebra is done in NumPy float64: the Hessians of one neuron are small
(``n_in + 1`` square) and their rank is often below their size
(``N < n_in + 1``), so the smallest non-zero singular value must be told apart
from rounding.
"""

from typing import Any, NamedTuple

import jax
import numpy as np

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


def float64(x: Any) -> np.ndarray:
  """``x`` on the host as a float64 NumPy array."""
  return np.asarray(jax.device_get(x), dtype=np.float64)


def _singular_values(matrix: Any) -> np.ndarray:
  return np.linalg.svd(float64(matrix), compute_uv=False)


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
  a = float64(matrix)
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
  h = float64(inputs)
  s = float64(curvature)
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
  h = float64(inputs)
  mean = h.mean(axis=0)
  variance = np.square(h - mean[None, :]).mean(axis=0)
  return transform.RunningStats(mean=mean, variance=variance)


def _mean_variance(stats: Any) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, variance)`` of an object with those fields, or of a pair."""
  if hasattr(stats, 'mean') and hasattr(stats, 'variance'):
    mean, variance = stats.mean, stats.variance
  else:
    mean, variance = stats
  return float64(mean).reshape(-1), float64(variance).reshape(-1)


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
  return np.sqrt(transform.regularised_variance(
      np.asarray(variance, np.float64), eps1, eps2))


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
  hess = float64(hessian)
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
