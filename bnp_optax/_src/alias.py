"""BNP combined with an optimizer, as one transformation."""

from jax.typing import ArrayLike
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import transform


def bnp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    eps1: ArrayLike = transform.DEFAULT_EPS1,
    eps2: ArrayLike = transform.DEFAULT_EPS2,
    rho: ArrayLike = transform.DEFAULT_RHO,
    debias: bool = False,
    graft: bool | ArrayLike = False,
    layer_specs: layers_lib.LayerSpecs = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Stochastic gradient descent with Batch Normalization Preconditioning.

  The paper's optimizer: ``theta <- theta - alpha (1/q^2) P P^T grad`` for
  every Dense and Conv layer (Eq. 15), plain SGD (optionally with momentum)
  elsewhere. Equivalent to
  ``optax.chain(scale_by_bnp(...), optax.sgd(learning_rate, momentum,
  nesterov))``.

  Args:
    learning_rate: a fixed learning rate or an optax schedule.
    momentum: heavy-ball momentum decay, or ``None`` for plain SGD.
    nesterov: use Nesterov momentum.
    eps1: see :func:`scale_by_bnp`.
    eps2: see :func:`scale_by_bnp`.
    rho: see :func:`scale_by_bnp`.
    debias: see :func:`scale_by_bnp`.
    graft: see :func:`scale_by_bnp`: each layer's step takes the size of its
      raw gradient, so that SGD's learning rate carries over.
    layer_specs: see :func:`scale_by_bnp`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs the
    keyword argument ``layer_stats``.

  Example:
    >>> import bnp_optax
    >>> tx = bnp_optax.bnp(learning_rate=0.1, momentum=0.9)

  References:
    S. Lange, K. Helfrich and Q. Ye, *Batch Normalization Preconditioning
    for Neural Network Training*, Journal of Machine Learning Research, 2022
    (Sections 3.3 and 4, Algorithms 2 and 3).
  """
  return optax.chain(
      transform.scale_by_bnp(
          eps1=eps1, eps2=eps2, rho=rho, debias=debias,
          graft=graft, layer_specs=layer_specs
      ),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )
