"""Batch Renormalization (Ioffe, 2017) as a Flax linen layer, a baseline.

Flax has no Batch Renormalization, so the harness brings its own. In training
the layer normalises with the batch statistics and then corrects them towards
the running statistics with two factors that carry no gradient::

  sigma_B = sqrt(var_B + epsilon),    sigma = sqrt(var + epsilon)
  r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
  d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
  y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

and updates ``mu <- momentum mu + (1 - momentum) mu_B`` and the same for
``var`` (Algorithm 1 of Ioffe, 2017). At inference ``y = gamma (x - mu) /
sigma + beta``, as BatchNorm.

The clipping bounds follow Ioffe's schedule, counted in training steps ``t``
(the step counter lives in the ``batch_stats`` collection)::

  r_max(t) = 1 + (r_max_final - 1) * clip((t - warmup) / r_ramp, 0, 1)
  d_max(t) = d_max_final * clip((t - warmup) / d_ramp, 0, 1)

with ``warmup = 5000``, ``r_max_final = 3`` over ``r_ramp = 40000`` steps and
``d_max_final = 5`` over ``d_ramp = 25000`` steps, Ioffe's values: the layer
is plain BatchNorm for the first 5000 steps, then relaxes. ``momentum=0.99``
and ``epsilon=1e-3`` are the TensorFlow/Keras defaults the paper used.

Reference: S. Ioffe, *Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models*, NeurIPS 2017.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def renorm_clip_bounds(step, *, warmup=5000, r_max=3.0, r_ramp=40000,
                       d_max=5.0, d_ramp=25000):
  """``(r_max(t), d_max(t))`` of Ioffe's schedule at training step ``step``."""
  t = jnp.asarray(step, jnp.float32) - warmup
  r = 1.0 + (r_max - 1.0) * jnp.clip(t / r_ramp, 0.0, 1.0)
  d = d_max * jnp.clip(t / d_ramp, 0.0, 1.0)
  return r, d


class BatchRenorm(nn.Module):
  """Batch Renormalization over all axes but the last (features).

  Attributes:
    use_running_average: normalise with the running statistics (inference).
    momentum: decay of the running mean and variance.
    epsilon: added to the variances.
    warmup: steps of plain BatchNorm before ``r_max``/``d_max`` relax.
    r_max: final ``r_max``.
    r_ramp: steps over which ``r_max`` grows from 1 to its final value.
    d_max: final ``d_max``.
    d_ramp: steps over which ``d_max`` grows from 0 to its final value.
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-3
  warmup: int = 5000
  r_max: float = 3.0
  r_ramp: int = 40000
  d_max: float = 5.0
  d_ramp: int = 25000

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    shape = (1,) * (x.ndim - 1) + (features,)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,),
                         jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (features,),
                        jnp.float32)
    steps = self.variable('batch_stats', 'steps', jnp.zeros, (), jnp.int32)
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    xf = x.astype(jnp.float32)
    running_sigma = jnp.sqrt(var.value + self.epsilon)
    if use_running_average:
      y = (xf - mean.value.reshape(shape)) / running_sigma.reshape(shape)
    else:
      batch_mean = jnp.mean(xf, axis=axes)
      batch_var = jnp.maximum(
          jnp.mean(jnp.square(xf), axis=axes) - jnp.square(batch_mean), 0.0)
      batch_sigma = jnp.sqrt(batch_var + self.epsilon)
      r_max, d_max = renorm_clip_bounds(
          steps.value, warmup=self.warmup, r_max=self.r_max,
          r_ramp=self.r_ramp, d_max=self.d_max, d_ramp=self.d_ramp)
      r = jax.lax.stop_gradient(
          jnp.clip(batch_sigma / running_sigma, 1.0 / r_max, r_max))
      d = jax.lax.stop_gradient(
          jnp.clip((batch_mean - mean.value) / running_sigma, -d_max, d_max))
      y = ((xf - batch_mean.reshape(shape)) / batch_sigma.reshape(shape)
           * r.reshape(shape) + d.reshape(shape))
      if not self.is_initializing():
        m = self.momentum
        mean.value = m * mean.value + (1 - m) * jax.lax.stop_gradient(
            batch_mean)
        var.value = m * var.value + (1 - m) * jax.lax.stop_gradient(batch_var)
        steps.value = steps.value + 1
    y = y * scale.reshape(shape) + bias.reshape(shape)
    return y.astype(x.dtype)
