"""Today's optimisers for the comparison with BNP (``docs/comparison.md``).

- ``adamw``: ``optax.adamw``; the run's ``weight_decay`` is its decoupled
  weight decay (not an L2 term added to the gradient).
- ``muon``: ``optax.contrib.muon`` (Newton-Schulz orthogonalised momentum)
  on the hidden Dense kernels and on the convolution kernels, which it sees
  as matrices of (window x input channels) by output channels through
  :func:`muon_dimension_numbers`; biases, normalisation scales, gains and the
  classifier (the last Dense layer) get its built-in AdamW, as Muon's
  authors recommend. The run's ``weight_decay`` is its decoupled decay.
- ``kfac``: kfac-jax's ``OptaxPreconditioner``; see :func:`kfac_available`.
- :func:`scale_by_bnp_centring`: BNP's centring without its scaling, the
  control of the BNP + Adam study.
- :func:`agc`: adaptive gradient clipping for the normaliser-free networks.
"""

import re
from typing import Any

import jax
import optax
from optax import contrib

import bnp_optax
from bnp_optax._src import layers as layers_lib
from bnp_optax._src import transform as _core
from bnp_optax.experiments import _normfree
from bnp_optax.experiments import _qscale

# Brock et al. (2021b): lambda = 0.01 at batch 4096; the best lambda grows
# as the batch shrinks (their Figure 3); we keep the published value.
AGC_CLIPPING = 0.01

_DENSE = re.compile(r'^Dense_(\d+)$')


def classifier_name(params: Any) -> str | None:
  """The top-level name of the classifier: ``head``, else the last Dense."""
  if not isinstance(params, dict):
    return None
  if _normfree.HEAD in params:
    return _normfree.HEAD
  dense = [int(m.group(1)) for m in map(_DENSE.match, params) if m]
  return f'Dense_{max(dense)}' if dense else None


def _not_classifier(params: Any) -> Any:
  head = classifier_name(params)
  return {k: jax.tree.map(lambda _, keep=(k != head): keep, v)
          for k, v in params.items()}


def muon_dimension_numbers(params: Any) -> Any:
  """Muon's view of every parameter: a matrix, or None (AdamW instead).

  Dense kernels ``(in, out)`` are matrices as they are; convolution kernels
  ``(*window, in, out)`` are reshaped to ``(window x in, out)`` (reduction
  over the window and the input channels). Vectors, scalars and the
  classifier's kernel are left to AdamW.
  """
  head = classifier_name(params)

  def dims(path, p):
    top = getattr(path[0], 'key', None) if path else None
    if top == head or getattr(path[-1], 'key', None) != 'kernel':
      return None
    if p.ndim == 2:
      return contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    if p.ndim > 2:
      return contrib.MuonDimensionNumbers(
          reduction_axis=tuple(range(p.ndim - 1)), output_axis=p.ndim - 1)
    return None

  return jax.tree_util.tree_map_with_path(dims, params)


def muon_available() -> str | None:
  """None when this optax's Muon takes dimension numbers, else why not."""
  if not hasattr(contrib, 'MuonDimensionNumbers'):
    return (f'optax {optax.__version__} has no '
            'optax.contrib.MuonDimensionNumbers (Muon on convolution '
            'kernels); upgrade optax')
  return None


def muon(learning_rate, weight_decay: float = 0.0
         ) -> optax.GradientTransformation:
  """``optax.contrib.muon`` with :func:`muon_dimension_numbers`."""
  return contrib.muon(learning_rate, weight_decay=weight_decay,
                      adam_weight_decay=weight_decay,
                      muon_weight_dimension_numbers=muon_dimension_numbers)


def agc(clipping: float = AGC_CLIPPING) -> optax.GradientTransformation:
  """Adaptive gradient clipping of every layer but the classifier."""
  return optax.masked(optax.adaptive_grad_clip(clipping), _not_classifier)


def scale_by_bnp_centring(*, rho=_core.DEFAULT_RHO
                          ) -> optax.GradientTransformationExtraArgs:
  r"""BNP's centring alone: ``sigma~^2 = 1`` and ``q^2 = 1``.

  With BNP's running mean ``mu`` (the same running statistics as
  :func:`bnp_optax.scale_by_bnp`):

  .. math::
    G_w \leftarrow G_w - \mu G_b, \quad
    G_b \leftarrow G_b - \textstyle\sum \mu G_w,

  the new ``G_w`` in the sum: BNP's ``P P^T`` without the per-feature
  ``1 / (sigma~^2 q^2)`` scaling. An experiment-only control (not the
  paper's method), computed by BNP's own ``precondition_layer`` with the
  variance set to 0 and ``eps2 = 1`` (so ``sigma~^2 = 1``), then ``q^2``
  undone as ``--bnp-q none`` does.
  """
  inner = bnp_optax.scale_by_bnp(rho=rho)
  undo_q = _qscale.undo_q_scaling('none')

  def update_fn(updates, state, params=None, *, layer_stats=None, **extra):
    del params, extra
    if layer_stats is None:
      raise ValueError(_core.MISSING_LAYER_STATS)
    tree = layers_lib.parse_tree(updates)
    stats = layers_lib.flatten_layer_stats(layer_stats)
    specs = layers_lib.match_statistics(tree, stats)
    leaves = list(tree.leaves)
    new_running = {}
    for name, layer in tree.layers.items():
      running = _core.update_running_stats(
          state.running_stats[name], stats[name],
          jax.numpy.asarray(rho, state.running_stats[name].mean.dtype))
      new_running[name] = running
      unit = _core.RunningStats(mean=running.mean,
                                variance=jax.numpy.zeros_like(
                                    running.variance))
      bias = None if layer.bias_index is None else leaves[layer.bias_index]
      kernel, bias = _core.precondition_layer(
          leaves[layer.kernel_index], bias, unit, specs[name],
          batch_size=stats[name].batch_size,
          positions=stats[name].positions, eps1=0.0, eps2=1.0)
      leaves[layer.kernel_index] = kernel
      if bias is not None:
        leaves[layer.bias_index] = bias
    centred = jax.tree_util.tree_unflatten(tree.treedef, leaves)
    centred, _ = undo_q.update(centred, optax.EmptyState(),
                               layer_stats=layer_stats)
    return centred, _core.ScaleByBNPState(
        count=optax.safe_increment(state.count), running_stats=new_running)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


KFAC_UNAVAILABLE = None


def kfac_available() -> str | None:
  """None when kfac-jax imports, else why not (the exception, in words)."""
  try:
    import kfac_jax  # noqa: F401  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return (f'kfac-jax cannot be imported here ({type(e).__name__}: {e}); '
            "pip install 'bnp_optax[kfac]'. kfac-jax 0.0.8 (the newest "
            'release) imports distrax, and distrax imports TensorFlow '
            "Probability's JAX substrate, whose newest release (0.25.0) "
            'fails to import with jax >= 0.5: jax.interpreters.xla has no '
            'pytype_aval_mappings any more')
  return None


def kfac() -> optax.GradientTransformation:
  """kfac-jax's preconditioner; raises ValueError naming why it cannot run.

  Raises:
    ValueError: always where kfac-jax does not import (see
      :func:`kfac_available`); where it does, its training step (loss
      registration, the preconditioner's state in the training state) is
      not wired into the harness yet.
  """
  why = kfac_available() or ('kfac-jax imports, but its training step is '
                             'not wired into the harness')
  raise ValueError(f'K-FAC: {why}')
