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
