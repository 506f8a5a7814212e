"""A small Vision Transformer (ViT) for CIFAR-10, in Flax linen.

Dosovitskiy et al. (2021) at a size that trains on a CPU: the image is cut
into non-overlapping ``patch x patch`` patches, each flattened and embedded
by one ``nn.Dense`` (the same map as a stride-``patch`` convolution, but a
dense layer on ``(B, T, patch * patch * 3)`` inputs, whose fan-in is every
pixel of the patch, as BNP should see it), a learned position embedding is
added, then ``depth`` pre-normalisation Transformer blocks::

    x = x + MultiHeadDotProductAttention(norm(x))
    x = x + Dense(dim) . GELU . Dense(mlp_dim) (norm(x))

a final ``norm``, the mean over tokens (no class token) and a ``nn.Dense``
head. ``norm`` is one of :data:`VIT_NORMS`:

- ``'ln'``: ``nn.LayerNorm`` over the features of each token (the standard);
- ``'dyt'``: Dynamic Tanh, ``scale * tanh(alpha * x) + bias`` with a learned
  scalar ``alpha`` (initialised to 0.5) and per-feature ``scale`` and
  ``bias`` (Zhu, Chen, He, LeCun and Liu, *Transformers without
  Normalization*, CVPR 2025);
- ``'none'``: the identity.

Every projection is a Flax layer BNP captures: the patch embedding, the
attention's query, key and value (``DenseGeneral``, features
``(heads, head_dim)``), its output (``DenseGeneral`` contracting the two
axes ``(heads, head_dim)``), the two MLP layers and the head. The
normalisation parameters and the position embedding pass through.
"""

import flax.linen as nn
import jax.numpy as jnp

VIT_NORMS = ('ln', 'dyt', 'none')

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


class DyT(nn.Module):
  """Dynamic Tanh: ``scale * tanh(alpha * x) + bias`` (Zhu et al., 2025).

  Attributes:
    alpha_init: the initial value of the learned scalar ``alpha``.
  """

  alpha_init: float = 0.5

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    alpha = self.param('alpha', nn.initializers.constant(self.alpha_init),
                       ())
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', _zeros, (features,))
    shape = (1,) * (x.ndim - 1) + (features,)
    return jnp.tanh(alpha * x) * scale.reshape(shape) + bias.reshape(shape)


def _norm(kind: str):
  if kind == 'ln':
    return nn.LayerNorm(epsilon=1e-6)
  if kind == 'dyt':
    return DyT()
  if kind == 'none':
    return lambda x: x
  raise ValueError(f'unknown ViT normalisation {kind!r}; expected one of '
                   f'{VIT_NORMS}')


class EncoderBlock(nn.Module):
  """A pre-normalisation Transformer encoder block.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    norm: one of :data:`VIT_NORMS`.
  """

  num_heads: int
  mlp_dim: int
  norm: str = 'ln'

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = _norm(self.norm)(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=_xavier, bias_init=_zeros,
        deterministic=True)(h)
    x = x + h
    h = _norm(self.norm)(x)
    h = nn.Dense(self.mlp_dim, kernel_init=_xavier, bias_init=_zeros)(h)
    h = nn.gelu(h)
    h = nn.Dense(dim, kernel_init=_xavier, bias_init=_zeros)(h)
    return x + h


class ViT(nn.Module):
  """A small Vision Transformer with mean pooling.

  Attributes:
    num_classes: output classes.
    norm: one of :data:`VIT_NORMS`.
    patch: patch side in pixels.
    dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of the MLPs.
  """

  num_classes: int
  norm: str = 'ln'
  patch: int = 4
  dim: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no batch statistics
    b, height, width, c = x.shape
    p = self.patch
    if height % p or width % p:
      raise ValueError(f'ViT: image size {height}x{width} is not a multiple '
                       f'of the patch size {p}')
    x = x.reshape(b, height // p, p, width // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(
        b, (height // p) * (width // p), p * p * c)
    x = nn.Dense(self.dim, kernel_init=_xavier, bias_init=_zeros,
                 name='patch_embedding')(x)
    position = self.param('position_embedding',
                          nn.initializers.normal(0.02),
                          (1, x.shape[1], self.dim))
    x = x + position
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.norm,
                       name=f'block_{i}')(x)
    x = _norm(self.norm)(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, kernel_init=_zeros, bias_init=_zeros,
                    name='head')(x)
