"""BNP's ``1/q^2`` per layer, and experiment-only variants without it.

BNP multiplies each layer's preconditioned gradient by ``1/q^2`` with
``q^2 = max(n_in / N, sqrt(r s))`` (Sections 3.3 and 4 of the paper). To
test whether that factor is what makes BNP slower than SGD at the same
learning rate, the harness can undo it after :func:`bnp_optax.scale_by_bnp`
(``--bnp-q``): ``no_conv`` multiplies the convolutions' updates by their
``q^2`` (BNP at rate ``eta q^2`` on the conv layers), ``none`` every layer's.
These are variants for experiments, not the paper's method (``paper``, the
default). ``q^2`` is computed by the same functions the optimizer uses.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bnp_optax._src import layers as layers_lib
from bnp_optax._src import transform

Q_SCALINGS = ('paper', 'no_conv', 'none')


def q_squared_per_layer(tree: Any, layer_stats: Any) -> dict[str, dict]:
  """``q^2`` of every layer BNP preconditions, as :func:`scale_by_bnp` has it.

  Args:
    tree: the parameters (or gradients) of the model.
    layer_stats: the statistics of a forward pass (``bnp_optax.linen.apply``).

  Returns:
    ``{layer: dict(kind, fan_in, batch_size, positions, q2)}``, the values
    as JAX scalars (``kind`` is ``'conv'`` or ``'dense'``).
  """
  parsed = layers_lib.parse_tree(tree)
  stats = layers_lib.flatten_layer_stats(layer_stats)
  specs = layers_lib.match_statistics(parsed, stats)
  out = {}
  for name, layer in parsed.layers.items():
    spec, batch = specs[name], stats[name]
    fan_in = spec.fan_in_size(layer.kernel_shape)
    out[name] = dict(
        kind=spec.kind, fan_in=fan_in, batch_size=batch.batch_size,
        positions=batch.positions,
        q2=transform.q_squared(fan_in, batch.batch_size, batch.positions))
  return out


def undo_q_scaling(which: str) -> optax.GradientTransformationExtraArgs:
  """Multiplies layers' updates by their ``q^2`` (after ``scale_by_bnp``).

  Args:
    which: ``'no_conv'`` (convolutions only) or ``'none'`` (every layer);
      ``'paper'`` is the identity.

  Returns:
    A stateless transformation whose ``update`` takes ``layer_stats``.
  """
  if which not in Q_SCALINGS:
    raise ValueError(f'unknown q scaling {which!r}; expected one of '
                     f'{Q_SCALINGS}')

  def update_fn(updates, state, params=None, *, layer_stats=None, **extra):
    del params, extra
    if which == 'paper':
      return updates, state
    parsed = layers_lib.parse_tree(updates)
    leaves = list(parsed.leaves)
    for name, info in q_squared_per_layer(updates, layer_stats).items():
      if which == 'no_conv' and info['kind'] != 'conv':
        continue
      layer = parsed.layers[name]
      for index in (layer.kernel_index, layer.bias_index):
        if index is not None:
          leaf = leaves[index]
          leaves[index] = (leaf * info['q2']).astype(leaf.dtype)
    return jax.tree_util.tree_unflatten(parsed.treedef, leaves), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def step_ratio(grads: Any, preconditioned: Any) -> dict[str, float]:
  """Per layer, ``|P g| / |g|`` over its kernel and bias (Frobenius norms)."""
  parsed = layers_lib.parse_tree(grads)
  new = layers_lib.parse_tree(preconditioned)
  out = {}
  for name, layer in parsed.layers.items():
    idx = [i for i in (layer.kernel_index, layer.bias_index) if i is not None]
    norm = lambda leaves: jnp.sqrt(sum(jnp.sum(jnp.square(leaves[i]))
                                       for i in idx))  # noqa: B023
    out[name] = float(norm(new.leaves) / norm(parsed.leaves))
  return out
