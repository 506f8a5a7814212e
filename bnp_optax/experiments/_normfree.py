"""Small-batch normalisers of today: GN + Weight Standardization, NF nets.

Two architectures that the comparison with BNP (``docs/comparison.md``)
trains at small batch sizes, where BatchNorm fails:

- ``gn_ws``: GroupNorm after Weight-Standardised convolutions (Qiao et al.,
  2019): every convolution uses the kernel standardised per output channel,
  ``W_hat = (W - mean(W)) / sqrt(var(W) + eps)`` over its window and input
  channels, followed by GroupNorm (groups of 4 channels, as the harness's
  ``gn``).
- ``nf``: a normaliser-free network (Brock, De and Smith, 2021a; Brock et
  al., 2021b): no normalisation layer; Scaled Weight Standardization,
  ``W_hat = g (W - mean(W)) / (std(W) sqrt(fan_in))`` with a learnable gain
  ``g`` per output channel (initialised to 1), the ReLU scaled by
  ``gamma = sqrt(2 / (1 - 1/pi))`` so that it preserves the variance of unit
  Gaussian inputs, and residual blocks ``h + alpha f(h / beta)`` with
  ``alpha = 0.2``, ``beta`` the analytically expected standard deviation of
  ``h`` (``beta^2`` grows by ``alpha^2`` per block and is reset to
  ``1 + alpha^2`` after a transition block, whose shortcut sees
  ``h / beta``), and a residual gain initialised to 0 (SkipInit, as NFNets).
  Training uses adaptive gradient clipping (``optax.adaptive_grad_clip``, all
  layers but the classifier), see ``_modern.py``.

Models: ``cnn5`` (the paper's 5-layer CNN) and the CIFAR ResNets
(``resnet110``, ResNet-20 with ``resnet_blocks=3``). The fully connected
network has no convolutions to standardise and is not built here.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnp_optax.experiments import _models

ARCHITECTURES = ('gn_ws', 'nf')
MODELS = ('cnn5', 'resnet110')
# Variance-preserving ReLU gain: Var(relu(z)) = (1 - 1/pi) / 2 for z ~ N(0,1).
RELU_GAIN = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
NF_ALPHA = 0.2
HEAD = 'head'  # The classifier's name: AGC and Muon leave it out.

_glorot = nn.initializers.glorot_uniform()
_zeros = nn.initializers.zeros


def scaled_relu(x):
  """ReLU times :data:`RELU_GAIN` (variance-preserving for N(0, 1) input)."""
  return nn.relu(x) * RELU_GAIN


class WSConv(nn.Module):
  """A convolution with a Weight-Standardised kernel (HWIO).

  Attributes:
    features: output channels.
    kernel_size: window.
    strides: stride (both axes).
    padding: ``'SAME'`` or ``'VALID'``.
    use_bias: add a bias.
    scaled: Scaled WS (NF nets): divide by ``std sqrt(fan_in)`` and multiply
      by a learnable per-channel gain; else plain WS (GN + WS).
    eps: floor on the kernel variance (times ``fan_in`` when scaled).
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: int = 1
  padding: str = 'SAME'
  use_bias: bool = True
  scaled: bool = False
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    fan_in = math.prod(shape[:-1])
    axes = tuple(range(len(shape) - 1))
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.var(kernel, axis=axes, keepdims=True)
    if self.scaled:
      gain = self.param('gain', nn.initializers.ones, (self.features,))
      w = (kernel - mean) * jax.lax.rsqrt(
          jnp.maximum(var * fan_in, self.eps)) * gain.reshape(
              (1,) * (len(shape) - 1) + (-1,))
    else:
      w = (kernel - mean) * jax.lax.rsqrt(var + self.eps)
    strides = (self.strides,) * (len(shape) - 2)
    y = jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), strides, self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', _zeros, (self.features,))
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y


def _gn():
  return _models.make_norm('gn', True, gn_group_size=4)


class CNN5Modern(nn.Module):
  """The 5-layer CNN with GN + WS (``gn_ws``) or normaliser-free (``nf``)."""

  arch: str = 'gn_ws'
  num_classes: int = 10
  filters: tuple[int, ...] = (32, 64, 32)
  dense: int = 64
  train: bool = False

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    del train  # Neither architecture has batch statistics.
    nf = self.arch == 'nf'
    act = scaled_relu if nf else nn.relu
    for i, f in enumerate(self.filters):
      x = WSConv(f, (3, 3), padding='VALID', scaled=nf,
                 eps=1e-4 if nf else 1e-5)(x)
      x = act(x)
      if not nf:
        x = _gn()(x)
      if i < len(self.filters) - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(self.dense, kernel_init=_glorot, bias_init=_zeros)(x))
    if not nf:
      x = _gn()(x)
    return nn.Dense(self.num_classes, kernel_init=_glorot, bias_init=_zeros,
                    name=HEAD)(x)


class _NFBlock(nn.Module):
  """Normaliser-free basic block: ``h + alpha g f(h / beta)``."""

  filters: int
  strides: int
  beta: float
  alpha: float = NF_ALPHA

  @nn.compact
  def __call__(self, h):
    conv = functools.partial(WSConv, scaled=True, eps=1e-4, use_bias=True)
    x = scaled_relu(h / self.beta)
    shortcut = h
    if h.shape[-1] != self.filters or self.strides != 1:
      shortcut = conv(self.filters, (1, 1), strides=self.strides)(x)
    y = conv(self.filters, (3, 3), strides=self.strides)(x)
    y = conv(self.filters, (3, 3))(scaled_relu(y))
    skip_gain = self.param('skip_gain', _zeros, ())
    return shortcut + self.alpha * skip_gain * y


class ResNetModern(nn.Module):
  """CIFAR ResNet-(6n+2) with GN + WS (post-activation) or NF blocks."""

  arch: str = 'gn_ws'
  num_classes: int = 10
  stage_sizes: tuple[int, ...] = (18, 18, 18)
  stage_filters: tuple[int, ...] = (16, 32, 64)
  train: bool = False

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    del train
    if self.arch == 'gn_ws':
      conv = functools.partial(WSConv, use_bias=False)
      x = nn.relu(_gn()(conv(self.stage_filters[0], (3, 3))(x)))
      for i, (size, filters) in enumerate(zip(self.stage_sizes,
                                              self.stage_filters)):
        for j in range(size):
          strides = 2 if i > 0 and j == 0 else 1
          x = _models._BasicBlock(filters, strides, conv, _gn)(x)  # pylint: disable=protected-access
    else:
      x = WSConv(self.stage_filters[0], (3, 3), scaled=True, eps=1e-4)(x)
      variance = 1.0
      for i, (size, filters) in enumerate(zip(self.stage_sizes,
                                              self.stage_filters)):
        for j in range(size):
          strides = 2 if i > 0 and j == 0 else 1
          x = _NFBlock(filters, strides, beta=math.sqrt(variance))(x)
          # A transition block's shortcut sees h / beta (variance 1).
          variance = (1.0 if (i > 0 and j == 0) else variance) + NF_ALPHA ** 2
      x = scaled_relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_glorot, bias_init=_zeros,
                    name=HEAD)(x)


def make_model(name: str, arch: str, num_classes: int, *,
               resnet_blocks: int | None = None) -> nn.Module:
  """The ``arch`` (``'gn_ws'`` or ``'nf'``) version of model ``name``.

  Raises:
    ValueError: an architecture or model without such a version.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {arch!r}; expected one of '
                     f'{ARCHITECTURES}')
  if name == 'cnn5':
    return CNN5Modern(arch=arch, num_classes=num_classes)
  if name == 'resnet110':
    n = 18 if resnet_blocks is None else resnet_blocks
    return ResNetModern(arch=arch, num_classes=num_classes,
                        stage_sizes=(n, n, n))
  raise ValueError(f'{arch} is built for the models {", ".join(MODELS)} '
                   f'(convolutional networks), not {name!r}')
