"""The layout of a preconditioned layer's kernel: which axis is what.

Everything that depends on how a kernel's axes are laid out goes through
:class:`LayerSpec`: the shape of its statistics and bias, its fan-in size,
and the view of a grouped convolution's kernel in which every group is an
independent layer.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerSpec(NamedTuple):
  """Layout of a preconditioned layer's kernel.

  Every kernel axis is one of four kinds. The statistics are indexed by the
  independent and fan-in axes (in that order), the bias by the independent
  and output axes (in that order).

  Attributes:
    spatial_axes: axes that span the convolution window, ``()`` for a Dense
      layer. A Flax ``Conv`` kernel is ``(*window, c_in, c_out)``, so its
      spatial axes are all but the last two.
    fan_in_axes: axes indexed by input features: ``(0,)`` for a Flax
      ``Dense`` kernel ``(n_in, n_out)``, ``(ndim - 2,)`` for a ``Conv``
      kernel, the contracted axes for ``DenseGeneral``.
    independent_axes: axes along which each slice of the kernel is a layer of
      its own, with its own statistics and bias (the ``batch_dims`` of
      ``DenseGeneral``, the ``batch_axis`` of ``nnx.LinearGeneral``); ``()``
      for ordinary layers.
    feature_groups: the ``feature_group_count`` of a grouped (or depthwise)
      convolution: the fan-in axis holds ``c_in / groups`` channels and the
      last (output) axis ``groups`` contiguous blocks of ``c_out / groups``;
      group ``g``'s outputs see input channels ``g c_in / groups`` to
      ``(g + 1) c_in / groups - 1`` only.

  The remaining axes are output axes.
  """

  spatial_axes: tuple[int, ...]
  fan_in_axes: tuple[int, ...]
  independent_axes: tuple[int, ...] = ()
  feature_groups: int = 1

  @property
  def kind(self) -> str:
    return 'conv' if self.spatial_axes else 'dense'

  def output_axes(self, ndim: int) -> tuple[int, ...]:
    taken = (
        set(self.spatial_axes)
        | set(self.fan_in_axes)
        | set(self.independent_axes)
    )
    return tuple(a for a in range(ndim) if a not in taken)

  def statistics_shape(
      self, kernel_shape: tuple[int, ...]
  ) -> tuple[int, ...]:
    shape = [kernel_shape[a] for a in self.independent_axes]
    fan_in = [kernel_shape[a] for a in self.fan_in_axes]
    fan_in[-1] *= self.feature_groups
    return tuple(shape + fan_in)

  def bias_shape(self, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = self.independent_axes + self.output_axes(len(kernel_shape))
    return tuple(kernel_shape[a] for a in axes)

  def fan_in_size(self, kernel_shape: tuple[int, ...]) -> int:
    """Rows of one output unit's ``w_i``: ``n_in``, or ``k^2 c_in / groups``."""
    return math.prod(
        kernel_shape[a] for a in self.spatial_axes + self.fan_in_axes
    )


DENSE = LayerSpec(spatial_axes=(), fan_in_axes=(0,))


def conv_spec(kernel_ndim: int, feature_groups: int = 1) -> LayerSpec:
  """The layout of a Flax ``Conv`` kernel ``(*window, c_in/groups, c_out)``."""
  return LayerSpec(
      spatial_axes=tuple(range(kernel_ndim - 2)),
      fan_in_axes=(kernel_ndim - 2,),
      feature_groups=feature_groups,
  )


def dense_general_spec(
    num_batch_dims: int, num_contracted: int
) -> LayerSpec:
  """The layout of a ``DenseGeneral`` kernel ``(*batch, *in, *out)``.

  With no batch dims and one contracted axis this is :data:`DENSE`.
  """
  return LayerSpec(
      spatial_axes=(),
      fan_in_axes=tuple(
          range(num_batch_dims, num_batch_dims + num_contracted)
      ),
      independent_axes=tuple(range(num_batch_dims)),
  )


def stacked_spec(spec: LayerSpec, lead: int) -> LayerSpec:
  """The layout of a kernel stacked along ``lead`` new leading axes.

  What ``nn.scan``/``nn.vmap`` (linen) and ``nnx.vmap`` make of a layer's
  kernel: every slice is a layer of its own, so the stacked axes are
  independent axes, ahead of the layer's own.
  """
  if not lead:
    return spec
  shift = lambda axes: tuple(a + lead for a in axes)
  return LayerSpec(
      spatial_axes=shift(spec.spatial_axes),
      fan_in_axes=shift(spec.fan_in_axes),
      independent_axes=tuple(range(lead)) + shift(spec.independent_axes),
      feature_groups=spec.feature_groups,
  )


def infer_layer_spec(kernel_shape: tuple[int, ...]) -> LayerSpec | None:
  """Flax's conventions: 2-D kernels are Dense, higher ones Conv."""
  if len(kernel_shape) == 2:
    return DENSE
  if len(kernel_shape) >= 3:
    return conv_spec(len(kernel_shape))
  return None


def check_spec(name: str, spec: LayerSpec, kernel_shape) -> LayerSpec:
  """Validates ``spec`` against the kernel and makes its axes non-negative."""
  ndim = len(kernel_shape)
  groups = (spec.spatial_axes, spec.fan_in_axes, spec.independent_axes)
  flat = [a for axes in groups for a in axes]
  if not spec.fan_in_axes or any(not -ndim <= a < ndim for a in flat):
    raise ValueError(
        f'layer {name!r}: {spec} does not fit its kernel of shape '
        f'{tuple(kernel_shape)} (needs fan-in axes, all within the kernel).'
    )
  spec = LayerSpec(*(tuple(a % ndim for a in axes) for axes in groups),
                   spec.feature_groups)
  flat = spec.spatial_axes + spec.fan_in_axes + spec.independent_axes
  if len(set(flat)) != len(flat):
    raise ValueError(f'layer {name!r}: {spec} uses a kernel axis twice.')
  if spec.feature_groups > 1:
    out = spec.output_axes(ndim)
    if len(out) != 1 or kernel_shape[out[0]] % spec.feature_groups:
      raise ValueError(
          f'layer {name!r}: feature_groups={spec.feature_groups} needs one '
          'output axis divisible by it; kernel shape '
          f'{tuple(kernel_shape)}.'
      )
  return spec


class KernelView(NamedTuple):
  """A kernel seen as independent layers, its axes sorted by kind.

  For a grouped convolution the output axis is split into ``(groups,
  outputs per group)`` and the group axis becomes independent (each group
  has its own input channels); otherwise the view is the kernel itself.
  The statistics in the view are indexed by ``independent + fan_in``, the
  bias by ``independent + outputs``.

  Attributes:
    shape: the kernel's shape in the view.
    spatial: the window axes.
    fan_in: the fan-in axes.
    independent: the independent axes.
    outputs: the output axes.
  """

  shape: tuple[int, ...]
  spatial: tuple[int, ...]
  fan_in: tuple[int, ...]
  independent: tuple[int, ...]
  outputs: tuple[int, ...]

  @property
  def statistics_axes(self) -> tuple[int, ...]:
    return self.independent + self.fan_in

  @property
  def bias_axes(self) -> tuple[int, ...]:
    return self.independent + self.outputs

  @property
  def window_size(self) -> int:
    return math.prod(self.shape[a] for a in self.spatial)

  def reshape_statistics(self, vector: jax.Array) -> jax.Array:
    """The kernel's statistics, ``spec.statistics_shape``, in the view.

    The last (channel) axis is split by group when the kernel is grouped.
    """
    independent = tuple(self.shape[a] for a in self.independent)
    fan_in = tuple(self.shape[a] for a in self.fan_in)
    return vector.reshape(independent + fan_in)

  def place(self, vector: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Broadcasts ``vector``, whose dims are the view's ``axes``, to it."""
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    vector = jnp.transpose(vector, order)
    shape = [1] * len(self.shape)
    for dim, axis in zip(vector.shape, sorted(axes)):
      shape[axis] = dim
    return vector.reshape(shape)


def kernel_view(spec: LayerSpec, kernel_shape: tuple[int, ...]) -> KernelView:
  """The :class:`KernelView` of a kernel laid out as ``spec``."""
  kernel_shape = tuple(kernel_shape)
  outputs = spec.output_axes(len(kernel_shape))
  if spec.feature_groups == 1:
    return KernelView(kernel_shape, spec.spatial_axes, spec.fan_in_axes,
                      spec.independent_axes, outputs)
  groups, (axis,) = spec.feature_groups, outputs
  moved = lambda axes: tuple(a if a < axis else a + 1 for a in axes)
  return KernelView(
      shape=(kernel_shape[:axis] + (groups, kernel_shape[axis] // groups)
             + kernel_shape[axis + 1:]),
      spatial=moved(spec.spatial_axes),
      fan_in=moved(spec.fan_in_axes),
      independent=moved(spec.independent_axes) + (axis,),
      outputs=(axis + 1,),
  )
