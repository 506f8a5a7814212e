"""Small Flax models shared by the tests, with NumPy forward passes.

The NumPy forward passes return every Dense/Conv layer's input, so the tests
can check the package's statistics and preconditioning against an
implementation that shares no code with it.
"""

import flax.linen as nn
import numpy as np


class MLP(nn.Module):
  """6 -> 5 -> 4 (no bias) -> 3, ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5, name='Dense_0')(x))
    x = nn.relu(nn.Dense(4, use_bias=False, name='Dense_1')(x))
    return nn.Dense(3, name='Dense_2')(x)


def mlp_layer_inputs(params, x):
  """{layer: input} and output of :class:`MLP`, in NumPy."""
  p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params.items()}
  h0 = np.asarray(x)
  h1 = np.maximum(h0 @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], 0)
  h2 = np.maximum(h1 @ p['Dense_1']['kernel'], 0)
  out = h2 @ p['Dense_2']['kernel'] + p['Dense_2']['bias']
  return {'Dense_0': h0, 'Dense_1': h1, 'Dense_2': h2}, out


class CNN(nn.Module):
  """(6, 6, 2) -> conv 3x3 SAME 3 -> conv 3x3 VALID stride 2 4 -> dense 3."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding='SAME', name='Conv_0')(x))
    x = nn.relu(
        nn.Conv(4, (3, 3), strides=2, padding='VALID', name='Conv_1')(x)
    )
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3, name='Dense_0')(x)


def np_conv(x, kernel, bias, *, stride, padding):
  """NHWC convolution with a (kh, kw, c_in, c_out) kernel, in NumPy."""
  kh, kw = kernel.shape[:2]
  if padding == 'SAME':
    x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  n, h, w, _ = x.shape
  out_h = (h - kh) // stride + 1
  out_w = (w - kw) // stride + 1
  out = np.zeros((n, out_h, out_w, kernel.shape[-1]), x.dtype)
  for a in range(kh):
    for b in range(kw):
      patch = x[
          :,
          a : a + stride * (out_h - 1) + 1 : stride,
          b : b + stride * (out_w - 1) + 1 : stride,
      ]
      out += patch @ kernel[a, b]
  return out + bias


def cnn_layer_inputs(params, x):
  """{layer: input}, {layer: output positions} and output of :class:`CNN`."""
  p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params.items()}
  h0 = np.asarray(x)
  a0 = np_conv(h0, p['Conv_0']['kernel'], p['Conv_0']['bias'], stride=1,
               padding='SAME')
  h1 = np.maximum(a0, 0)
  a1 = np_conv(h1, p['Conv_1']['kernel'], p['Conv_1']['bias'], stride=2,
               padding='VALID')
  h2 = np.maximum(a1, 0).reshape(x.shape[0], -1)
  out = h2 @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  inputs = {'Conv_0': h0, 'Conv_1': h1, 'Dense_0': h2}
  positions = {
      'Conv_0': a0.shape[1] * a0.shape[2],
      'Conv_1': a1.shape[1] * a1.shape[2],
      'Dense_0': 1,
  }
  return inputs, positions, out


def badly_scaled_inputs(rng, shape):
  """Inputs with per-feature offsets and scales spanning four decades."""
  features = shape[-1]
  offsets = rng.uniform(-20, 20, size=features)
  scales = 10.0 ** rng.uniform(-2, 2, size=features)
  return offsets + scales * rng.standard_normal(shape)


class ScanBlock(nn.Module):
  """One Dense + ReLU step, to be repeated by ``nn.scan``."""

  @nn.compact
  def __call__(self, carry, _):
    return nn.relu(nn.Dense(4)(carry)), None


def scanned(collections):
  """Three ``ScanBlock`` steps under ``nn.scan`` with ``variable_axes``."""

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(ScanBlock, variable_axes=collections,
                     split_rngs={'params': True}, length=3)
      return scan(name='blocks')(x, None)[0]

  return Scanned()

