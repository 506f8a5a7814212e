"""The benchmark networks: the paper's, from the experiment harness.

One definition of each network lives in ``bnp_optax.experiments`` (used by
the harness, the examples and the notebooks); these are the same
modules, configured for timing a training step (``train=True``, so the
BatchNorm variants use and update batch statistics):

- ``FC``: the paper's fully connected network (Sec. 5), 784-100-100-100-10,
  ReLU; with ``batch_norm=True`` a BatchNorm follows every hidden
  activation ("normalization is applied post-activation").
- ``CNN5``: the paper's 5-layer CNN (Sec. 5, the TensorFlow tutorial
  network): three 3x3 VALID convolutions of 32-64-32 filters with 2x2
  max-pooling after the first two, then Dense 64 and Dense 10; BatchNorm
  after every hidden activation.
- ``ResNet18``: a ResNet-18-like network for 32x32 inputs (3x3 stem, four
  stages of two basic blocks, 64-128-256-512 channels), the ResNet-sized
  case meant for a GPU. Its BatchNorm variant is the usual conv-BN-ReLU
  placement; the vanilla variant has no normalisation (and convolution
  biases, which BNP centres with).
- ``ViT``: the small Vision Transformer of ``docs/transformers.md``
  (LayerNorm), for the step ratios against SGD and AdamW.
"""

from bnp_optax import experiments

# pylint: disable=invalid-name  (classes in spirit: they build modules)


def _norm(batch_norm: bool) -> str:
  return 'bn' if batch_norm else 'none'


def FC(*, batch_norm: bool = False, num_classes: int = 10,
       hidden: tuple[int, ...] = (100, 100, 100)):
  """784-100-100-100-10, ReLU, optional post-activation BatchNorm.

  ``hidden`` sets other widths (the scaling cases).
  """
  return experiments.FullyConnected(norm=_norm(batch_norm), hidden=hidden,
                                num_classes=num_classes, train=True)


def CNN5(*, batch_norm: bool = False, num_classes: int = 10,
         padding: str = 'VALID'):
  """Conv 32-64-32 (3x3), max-pool after the first two, Dense 64, Dense 10."""
  return experiments.CNN5(norm=_norm(batch_norm), num_classes=num_classes,
                      padding=padding, train=True)


def ResNet18(*, batch_norm: bool = False, num_classes: int = 10):
  """ResNet-18-like for 32x32 inputs (about 11M parameters)."""
  return experiments.ResNet(
      norm=_norm(batch_norm), num_classes=num_classes,
      stage_sizes=(2, 2, 2, 2), stage_filters=(64, 128, 256, 512),
      conv_bias=not batch_norm, train=True)


def DeepMLP(*, batch_norm: bool = False, num_classes: int = 10,
            depth: int = 10, width: int = 32):
  """A plain MLP of ``depth`` hidden Dense layers of ``width`` units, ReLU.

  The compile-time depth cases: every hidden layer has the same shape, so
  XLA can share the kernels of their identical per-layer computations.
  """
  return experiments.FullyConnected(
      norm=_norm(batch_norm), hidden=(width,) * depth,
      num_classes=num_classes, train=True)


def CifarResNet(*, batch_norm: bool = False, num_classes: int = 10,
                depth: int = 20):
  """He et al.'s CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16-32-64."""
  if (depth - 2) % 6:
    raise ValueError(f'a CIFAR ResNet has depth 6n + 2, got {depth}')
  n = (depth - 2) // 6
  return experiments.ResNet(
      norm=_norm(batch_norm), num_classes=num_classes, stage_sizes=(n,) * 3,
      stage_filters=(16, 32, 64), conv_bias=not batch_norm, train=True)


def ViT(*, batch_norm: bool = False, num_classes: int = 10):
  """The small ViT of docs/transformers.md, with LayerNorm in both variants.

  A Transformer has no BatchNorm variant: ``batch_norm`` is ignored, and
  the comparison is between base optimizers (``sgd``, ``adamw``) and BNP
  before them.
  """
  del batch_norm
  return experiments.make_model('vit', 'none', num_classes)
