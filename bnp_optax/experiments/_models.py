"""The paper's models (Section 5, Appendix B) in Flax linen.

Every model takes ``(x, train)`` with ``x`` in NHWC (``train`` defaults to
the module's ``train`` attribute, False) and a normalisation
``norm`` among ``'none'``, ``'bn'`` (BatchNorm), ``'renorm'`` (Batch
Renormalization), ``'ln'`` (LayerNorm), ``'gn'`` (GroupNorm) and ``'bn4'``
(BN with 4 Things, Summers and Dinneen 2020, see ``_bn4.py``; the model's
``bn4`` settings say whether it is Ghost BN or Batch + Group Norm). BNP needs
no layer: it is ``norm='none'`` (or ``'gn'`` for BNP+GN) with the BNP optimizer.

- ``fc``: three hidden Dense layers of 100, ReLU, Glorot-uniform weights and
  zero biases; the normalisation comes after the activation
  (post-activation), as in the paper's BN network.
- ``fc2``: the same with two hidden layers, the network of the paper's
  Figure 8 (Section 5.1).
- ``cnn5``: the TensorFlow tutorial CNN the paper uses: three 3x3 VALID
  convolutions with 32, 64 and 32 filters, ReLU, 2x2 max pooling after the
  first two, then Dense(64) and Dense(classes); Glorot-uniform weights, zero
  biases, normalisation after each hidden activation.
- ``flax_mnist_cnn``: the CNN of Flax's linen MNIST example
  (``examples/mnist/train.py`` up to flax 0.8): Conv(32, 3x3, SAME), ReLU,
  2x2 average pooling, Conv(64, 3x3), ReLU, pooling, Dense(256), ReLU,
  Dense(classes), with Flax's default initialisation (LeCun-normal kernels,
  zero biases). The example trains it with ``optax.sgd(0.1, 0.9)`` at batch
  size 128 on pixels / 255 (``--optimizer momentum --lr 0.1``). A
  normalisation other than ``'none'`` comes after each hidden activation
  (the example has none).
- ``resnet110``: He et al. (2016a) CIFAR ResNet, 3 stages of 18 basic blocks
  (16, 32, 64 filters), conv-norm-ReLU, 1x1 projection shortcuts where the
  shape changes.
- ``preact_resnet110``: the pre-activation version (He et al., 2016b),
  norm-ReLU-conv.
- ``resnet18``: the ImageNet ResNet-18 (7x7 stem, max pooling, 2-2-2-2 basic
  blocks of 64-512 filters). On 32x32 inputs it runs, though the paper's
  ImageNet setting needs 224x224.

ResNets use He-normal weights (scaled by ``init_scale``) and GroupNorm with
4 channels per group (ResNet-110s) or 32 groups (ResNet-18), as Appendix B.
"""

from collections.abc import Callable
import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp
import optax

from bnp_optax.experiments import _batch_renorm
from bnp_optax.experiments import _bn4
from bnp_optax.experiments import _vit

NORMS = ('none', 'bn', 'renorm', 'ln', 'gn', 'bn4')

_glorot = nn.initializers.glorot_uniform()
_zeros = nn.initializers.zeros


def make_norm(norm: str, train: bool, *, gn_group_size: int | None = 4,
              gn_groups: int | None = None,
              bn4: _bn4.BN4Settings | None = None) -> Callable | None:
  """A fresh normalisation layer for ``norm``, or None for ``'none'``.

  ``bn4`` configures ``'bn4'`` (default: ``BN4Settings()``, Ghost BN).
  """
  if norm == 'none':
    return None
  if norm == 'bn4':
    return (bn4 or _bn4.BN4Settings()).layer(train)
  if norm == 'bn':
    # TensorFlow's defaults, as the paper used.
    return nn.BatchNorm(use_running_average=not train, momentum=0.99,
                        epsilon=1e-3)
  if norm == 'renorm':
    return _batch_renorm.BatchRenorm(use_running_average=not train)
  if norm == 'ln':
    return _LayerNormAllFeatures()
  if norm == 'gn':
    if gn_groups is not None:
      return _GroupNormCapped(num_groups=gn_groups)
    return _GroupNormCapped(group_size=gn_group_size)
  raise ValueError(f'unknown normalisation {norm!r}; expected one of {NORMS}')


class _LayerNormAllFeatures(nn.Module):
  """LayerNorm over every non-batch axis (features and positions)."""

  @nn.compact
  def __call__(self, x):
    axes = tuple(range(1, x.ndim))
    return nn.LayerNorm(epsilon=1e-3, reduction_axes=axes, feature_axes=-1)(x)


class _GroupNormCapped(nn.Module):
  """GroupNorm whose group count never exceeds the channel count."""

  num_groups: int | None = None
  group_size: int | None = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if self.num_groups is not None:
      groups = min(self.num_groups, channels)
      while channels % groups:
        groups -= 1
      return nn.GroupNorm(num_groups=groups, epsilon=1e-5)(x)
    size = min(self.group_size, channels)
    while channels % size:
      size -= 1
    return nn.GroupNorm(num_groups=None, group_size=size, epsilon=1e-5)(x)


def cross_entropy(logits, labels):
  """Mean softmax cross entropy with integer labels: the paper's loss."""
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _apply_norm(norm, train, x, **kwargs):
  layer = make_norm(norm, train, **kwargs)
  return x if layer is None else layer(x)


class FullyConnected(nn.Module):
  """The paper's FC network: 3 x 100, ReLU, post-activation normalisation."""

  norm: str = 'none'
  num_classes: int = 10
  hidden: tuple[int, ...] = (100, 100, 100)
  train: bool = False
  bn4: _bn4.BN4Settings | None = None

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    train = self.train if train is None else train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, kernel_init=_glorot, bias_init=_zeros)(x))
      x = _apply_norm(self.norm, train, x, gn_group_size=4, bn4=self.bn4)
    return nn.Dense(self.num_classes, kernel_init=_glorot,
                    bias_init=_zeros)(x)


class CNN5(nn.Module):
  """The 5-layer CNN (TensorFlow tutorial): conv 32-64-32, Dense 64, Dense."""

  norm: str = 'none'
  num_classes: int = 10
  filters: tuple[int, ...] = (32, 64, 32)
  dense: int = 64
  train: bool = False
  padding: str = 'VALID'  # the tutorial's; 'SAME' keeps feature maps large
  bn4: _bn4.BN4Settings | None = None

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    train = self.train if train is None else train
    for i, f in enumerate(self.filters):
      x = nn.Conv(f, (3, 3), padding=self.padding, kernel_init=_glorot,
                  bias_init=_zeros)(x)
      x = _apply_norm(self.norm, train, nn.relu(x), gn_group_size=4,
                      bn4=self.bn4)
      if i < len(self.filters) - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, kernel_init=_glorot, bias_init=_zeros)(x))
    x = _apply_norm(self.norm, train, x, gn_group_size=4, bn4=self.bn4)
    return nn.Dense(self.num_classes, kernel_init=_glorot,
                    bias_init=_zeros)(x)


class FlaxMnistCNN(nn.Module):
  """The CNN of Flax's linen MNIST example (conv 32-64, Dense 256)."""

  norm: str = 'none'
  num_classes: int = 10
  train: bool = False
  bn4: _bn4.BN4Settings | None = None

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    train = self.train if train is None else train
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = _apply_norm(self.norm, train, x, gn_group_size=4, bn4=self.bn4)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(256)(x))
    x = _apply_norm(self.norm, train, x, gn_group_size=4, bn4=self.bn4)
    return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
  """Post-activation basic block (He et al., 2016a)."""

  filters: int
  strides: int
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), strides=self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      x = self.conv(self.filters, (1, 1), strides=self.strides)(x)
      x = self.norm()(x)
    return nn.relu(x + y)


class _PreActBlock(nn.Module):
  """Pre-activation basic block (He et al., 2016b)."""

  filters: int
  strides: int
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(x))
    shortcut = x
    if x.shape[-1] != self.filters or self.strides != 1:
      shortcut = self.conv(self.filters, (1, 1), strides=self.strides)(y)
    y = self.conv(self.filters, (3, 3), strides=self.strides)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    return shortcut + y


class ResNet(nn.Module):
  """ResNets of the paper: CIFAR ResNet-(6n+2), pre-activation, ResNet-18.

  Attributes:
    norm: the normalisation, see :data:`NORMS`.
    num_classes: output classes.
    stage_sizes: blocks per stage.
    stage_filters: filters per stage.
    preact: pre-activation blocks (He et al., 2016b).
    imagenet_stem: 7x7/2 convolution and 3x3/2 max pooling (ResNet-18).
    init_scale: factor on the He-normal weight initialisation.
    conv_bias: give the convolutions a bias (for BNP, which centres with it).
    gn_groups: GroupNorm group count (ResNet-18), else groups of 4 channels.
    bn4: settings of the ``'bn4'`` layers.
    train: the default of ``__call__``'s ``train`` (batch statistics).
  """

  norm: str = 'bn'
  num_classes: int = 10
  stage_sizes: tuple[int, ...] = (18, 18, 18)
  stage_filters: tuple[int, ...] = (16, 32, 64)
  preact: bool = False
  imagenet_stem: bool = False
  init_scale: float = 1.0
  conv_bias: bool = False
  gn_groups: int | None = None
  train: bool = False
  bn4: _bn4.BN4Settings | None = None

  @nn.compact
  def __call__(self, x, train: bool | None = None):
    train = self.train if train is None else train
    init = nn.initializers.variance_scaling(
        2.0 * self.init_scale ** 2, 'fan_out', 'normal')
    conv = functools.partial(nn.Conv, padding='SAME', kernel_init=init,
                             use_bias=self.conv_bias, bias_init=_zeros)
    if self.norm == 'none':
      norm = lambda: (lambda y: y)
    else:
      norm = functools.partial(make_norm, self.norm, train, gn_group_size=4,
                               gn_groups=self.gn_groups, bn4=self.bn4)
    if self.imagenet_stem:
      x = conv(self.stage_filters[0], (7, 7), strides=2)(x)
    else:
      x = conv(self.stage_filters[0], (3, 3))(x)
    if not self.preact:
      x = nn.relu(norm()(x))
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    block = _PreActBlock if self.preact else _BasicBlock
    for i, (size, filters) in enumerate(zip(self.stage_sizes,
                                            self.stage_filters)):
      for j in range(size):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(filters, strides, conv, norm)(x)
    if self.preact:
      x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=_glorot, bias_init=_zeros)(x)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Options of :func:`make_model` that some builders read.

  Attributes:
    init_scale: factor on the ResNets' He-normal initialisation.
    conv_bias: give the ResNets' convolutions a bias.
    resnet_blocks: blocks per stage of the CIFAR ResNets instead of 18.
    bn4: settings of the ``'bn4'`` layers.
  """

  init_scale: float = 1.0
  conv_bias: bool = False
  resnet_blocks: int | None = None
  bn4: _bn4.BN4Settings | None = None


@dataclasses.dataclass(frozen=True)
class Model:
  """One entry of the model table :data:`MODELS`.

  Attributes:
    name: the name on the command line and in results.
    build: ``build(norm, num_classes, options)`` returns the linen module,
      ``options`` a :class:`ModelOptions`.
    convolutional: has convolutions. XLA's CPU backend runs a convolution
      inside a while loop (the scan of several steps per call) about 9x
      slower than outside one: cnn5 at batch 128 took 2.9 s per step in a
      scan of 8 and 0.33 s with one step per call (2026-11-26, 2 CPU
      cores), so such a model trains one step per call on CPU.
    checkpoints: ``--checkpoint auto`` saves checkpoints of its runs (the
      long ones).
    conditioning: Figure 8's diagnostics apply: a fully connected network
      whose ``hidden`` attribute lists its hidden layers, the output layer
      named ``Dense_{len(hidden)}``.
    paper_table: the paper's table of learning rates for it, if any.
  """

  name: str
  build: Callable[[str, int, ModelOptions], nn.Module]
  convolutional: bool
  checkpoints: bool
  conditioning: bool = False
  paper_table: str | None = None


def _fc(norm, num_classes, o):
  return FullyConnected(norm=norm, num_classes=num_classes, bn4=o.bn4)


def _fc2(norm, num_classes, o):
  return FullyConnected(norm=norm, num_classes=num_classes,
                        hidden=(100, 100), bn4=o.bn4)


def _cnn5(norm, num_classes, o):
  return CNN5(norm=norm, num_classes=num_classes, bn4=o.bn4)


def _flax_mnist_cnn(norm, num_classes, o):
  return FlaxMnistCNN(norm=norm, num_classes=num_classes, bn4=o.bn4)


def _cifar_resnet(norm, num_classes, o, *, preact):
  n = 18 if o.resnet_blocks is None else o.resnet_blocks
  return ResNet(norm=norm, num_classes=num_classes, stage_sizes=(n, n, n),
                preact=preact, init_scale=o.init_scale,
                conv_bias=o.conv_bias, bn4=o.bn4)


def _resnet18(norm, num_classes, o):
  return ResNet(norm=norm, num_classes=num_classes, stage_sizes=(2, 2, 2, 2),
                stage_filters=(64, 128, 256, 512), imagenet_stem=True,
                init_scale=o.init_scale, conv_bias=o.conv_bias, gn_groups=32,
                bn4=o.bn4)


def _vit_model(norm, num_classes, o, *, vit_norm):
  del o
  if norm != 'none':
    raise ValueError(
        f'the ViT has its own normalisation ({vit_norm!r}); use a method '
        f"without one (norm 'none'), not {norm!r}")
  return _vit.ViT(num_classes=num_classes, norm=vit_norm)


# The model table. Adding a model: its linen module and builder above, one
# entry here; the CLI, the run identity's choices, `list`, the steps per
# call, checkpointing and the paper's rate lookup all read this table.
MODELS = {m.name: m for m in (
    Model('fc', _fc, convolutional=False, checkpoints=False,
          conditioning=True, paper_table='Table 2'),
    Model('fc2', _fc2, convolutional=False, checkpoints=False,
          conditioning=True),
    Model('cnn5', _cnn5, convolutional=True, checkpoints=True,
          paper_table='Table 3'),
    Model('flax_mnist_cnn', _flax_mnist_cnn, convolutional=True,
          checkpoints=True),
    Model('resnet110', functools.partial(_cifar_resnet, preact=False),
          convolutional=True, checkpoints=True, paper_table='Table 3'),
    Model('preact_resnet110', functools.partial(_cifar_resnet, preact=True),
          convolutional=True, checkpoints=True, paper_table='Table 3'),
    Model('resnet18', _resnet18, convolutional=True, checkpoints=True,
          paper_table='Table 3'),
    # The Transformer comparison (docs/transformers.md): a small ViT whose
    # normalisation is its own (_vit.py), with a method of norm 'none'.
    Model('vit', functools.partial(_vit_model, vit_norm='ln'),
          convolutional=False, checkpoints=False),
    Model('vit_dyt', functools.partial(_vit_model, vit_norm='dyt'),
          convolutional=False, checkpoints=False),
    Model('vit_nonorm', functools.partial(_vit_model, vit_norm='none'),
          convolutional=False, checkpoints=False),
)}


def make_model(name: str, norm: str, num_classes: int, *,
               init_scale: float = 1.0, conv_bias: bool = False,
               resnet_blocks: int | None = None,
               bn4: _bn4.BN4Settings | None = None) -> nn.Module:
  """Builds model ``name`` with normalisation ``norm``.

  Args:
    name: one of :data:`MODELS`.
    norm: one of :data:`NORMS`.
    num_classes: output classes.
    init_scale: factor on the ResNets' He-normal initialisation.
    conv_bias: give the ResNets' convolutions a bias.
    resnet_blocks: blocks per stage of the CIFAR ResNets instead of 18
      (a smaller network of the same family, e.g. 3 for ResNet-20).
    bn4: settings of the ``'bn4'`` layers (default: Ghost BN, see
      ``_bn4.BN4Settings``).

  Returns:
    The Flax linen module.
  """
  if norm not in NORMS:
    raise ValueError(f'unknown normalisation {norm!r}; expected one of {NORMS}')
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; expected one of '
                     f'{tuple(MODELS)}')
  return MODELS[name].build(norm, num_classes, ModelOptions(
      init_scale=init_scale, conv_bias=conv_bias,
      resnet_blocks=resnet_blocks, bn4=bn4))
