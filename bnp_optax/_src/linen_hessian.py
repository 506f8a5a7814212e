"""The Hessian of one neuron of a Flax linen model (the paper's Figure 8).

Finds the factors ``H`` (the layer's input, or a convolution's patch matrix)
and ``S`` (the loss's curvature in the neuron's pre-activations) of
``H_hat^T S H_hat`` by running the model with
``linen_capture.intercept_layer``; the theory that uses them is in
``conditioning``, which needs no Flax.
"""

from collections.abc import Callable
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnp_optax._src import capture
from bnp_optax._src import conditioning
from bnp_optax._src import linen_capture


class _Static:
  """A static ``jax.jit`` argument compared by identity.

  Linen models with list fields (``nn.Sequential``) and keyword arguments
  holding arrays cannot be hashed; the same object gives a cache hit.
  """

  def __init__(self, value: Any):
    self.value = value

  def __hash__(self) -> int:
    return id(self.value)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Static) and other.value is self.value


def _static_kwargs(apply_kwargs: dict[str, Any]) -> Any:
  """Hashable keyword arguments by value, others by identity."""
  items = tuple(sorted(apply_kwargs.items()))
  try:
    hash(items)
  except TypeError:
    return _Static(apply_kwargs)
  return items


def _kwargs_of(static_kwargs: Any) -> dict[str, Any]:
  if isinstance(static_kwargs, _Static):
    return static_kwargs.value
  return dict(static_kwargs)


def _capture_layer(model, variables, x, layer, apply_kwargs):
  """Runs the model once; returns the target module (unbound) and input."""
  calls = []

  def record(module, args, kwargs, outputs):
    if isinstance(module, (nn.Dense, nn.Conv)):
      calls.append((module.clone(parent=None),
                    capture.first_input(args, kwargs, module)))
    return outputs

  with linen_capture.intercept_layer(layer, record):
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


@functools.partial(
    jax.jit, static_argnames=('model', 'layer', 'neuron', 'static_kwargs'))
def _hessian_factors(variables, x, loss, *, model, layer, neuron,
                     static_kwargs):
  """``(H, S)`` of one neuron; jitted, so cached per model, layer, neuron."""
  model = model.value
  apply_kwargs = _kwargs_of(static_kwargs)
  module, inputs = _capture_layer(model, variables, x, layer, apply_kwargs)
  params = _layer_params(variables, layer)
  h = _input_matrix(module, params, inputs, neuron)

  def perturbed_loss(delta):
    def perturb(module, args, kwargs, outputs):
      del args, kwargs
      if isinstance(module, (nn.Dense, nn.Conv)):
        outputs = outputs.at[..., neuron].add(delta.astype(outputs.dtype))
      return outputs

    with linen_capture.intercept_layer(layer, perturb):
      return loss(model.apply(variables, x, **apply_kwargs))

  out_shape = jax.eval_shape(
      lambda: module.apply({'params': params}, inputs)
  ).shape
  delta = jnp.zeros(out_shape[:-1], inputs.dtype)
  m = math.prod(out_shape[:-1])
  s = jax.hessian(perturbed_loss)(delta).reshape(m, m)
  return h, s


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
) -> conditioning.NeuronHessian:
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
  h, s = _hessian_factors(
      variables, x, _as_partial(loss_fn), model=_Static(model), layer=layer,
      neuron=neuron, static_kwargs=_static_kwargs(apply_kwargs))
  return conditioning.NeuronHessian(
      hessian=conditioning.hessian_from_inputs(h, s),
      inputs=conditioning.float64(h),
      curvature=conditioning.float64(s),
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
  return conditioning.float64(jax.jit(jax.hessian(loss_of))(w_hat))
