"""The benchmark networks, each with an optional post-activation BatchNorm.

- ``FC``: the paper's fully connected network (Sec. 5, after Ioffe and
  Szegedy), 784-100-100-100-10, ReLU; with ``batch_norm=True`` a BatchNorm
  follows every hidden activation ("normalization is applied
  post-activation").
- ``CNN5``: the paper's 5-layer CNN (Sec. 5, the TensorFlow tutorial
  network): three 3x3 convolutions of 32-64-32 filters (VALID, as in the
  tutorial) with 2x2 max-pooling after the first two, then Dense 64 and
  Dense 10; BatchNorm after every hidden activation.
- ``ResNet18``: a ResNet-18-like network for 32x32 inputs (3x3 stem, four
  stages of two basic blocks, 64-128-256-512 channels), the ResNet-sized
  case meant for a GPU. Its BatchNorm variant is the usual
  conv-BN-ReLU placement; the vanilla variant has no normalisation.
"""

from collections.abc import Sequence

import flax.linen as nn


def _bn(x):
  return nn.BatchNorm(use_running_average=False, momentum=0.99)(x)


class FC(nn.Module):
  """784-100-100-100-10, ReLU, optional post-activation BatchNorm."""

  hidden: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.batch_norm:
        x = _bn(x)
    return nn.Dense(self.num_classes)(x)


class CNN5(nn.Module):
  """Conv 32-64-32 (3x3), max-pool after the first two, Dense 64, Dense 10."""

  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    for i, filters in enumerate((32, 64, 32)):
      x = nn.relu(nn.Conv(filters, (3, 3), padding='VALID')(x))
      if self.batch_norm:
        x = _bn(x)
      if i < 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    if self.batch_norm:
      x = _bn(x)
    return nn.Dense(self.num_classes)(x)


class _Block(nn.Module):
  filters: int
  strides: int
  batch_norm: bool

  @nn.compact
  def __call__(self, x):
    norm = _bn if self.batch_norm else (lambda v: v)
    y = nn.Conv(self.filters, (3, 3), self.strides, padding='SAME')(x)
    y = nn.relu(norm(y))
    y = norm(nn.Conv(self.filters, (3, 3), padding='SAME')(y))
    if x.shape != y.shape:
      x = norm(nn.Conv(self.filters, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18-like for 32x32 inputs (about 11M parameters)."""

  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x):
    norm = _bn if self.batch_norm else (lambda v: v)
    x = nn.relu(norm(nn.Conv(64, (3, 3), padding='SAME')(x)))
    for stage, filters in enumerate((64, 128, 256, 512)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _Block(filters, strides, self.batch_norm)(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
