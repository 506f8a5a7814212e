"""The jaxpr analysis of ``bnp_optax.tracing`` alone: nothing is evaluated.

Every function is traced from ``jax.ShapeDtypeStruct`` shapes, so no array
exists; the analysis says which equations are layers, their layouts and
biases, and why the other parameters are passed through.
"""

import jax
from jax import lax
import jax.numpy as jnp
import pytest

from bnp_optax._src import layout
from bnp_optax._src import tracing_analysis

F32 = jnp.float32


def _analyse(fn, leaf_shapes, *arg_shapes):
  """Traces ``fn(*leaves, *args)`` from shapes and analyses its jaxpr."""
  structs = [jax.ShapeDtypeStruct(s, F32) for s in (*leaf_shapes, *arg_shapes)]
  closed = jax.make_jaxpr(fn)(*structs)
  return tracing_analysis.analyse(closed.jaxpr, leaf_shapes, len(arg_shapes))


def _conv(x, w):
  return lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('fn, leaf_shapes, x_shape, spec, bias', [
    (lambda w, b, x: x @ w + b[None], [(3, 4), (4,)], (8, 3),
     layout.DENSE, 1),
    (lambda w, b, x: x @ w, [(3, 4), (4,)], (8, 3), layout.DENSE, None),
    # y = w @ x + b, the Equinox layout: fan-in is the leaf's axis 1.
    (lambda w, b, x: (w @ x.T).T + b[None], [(4, 3), (4,)], (8, 3),
     layout.LayerSpec((), (1,)), 1),
    (lambda w, b, x: _conv(x, w) + b[None, None, None],
     [(3, 3, 2, 5), (5,)], (1, 6, 6, 2),
     layout.conv_spec(4), 1),
    # A bias broadcast along the features is not this layer's bias.
    (lambda w, b, x: x @ w + b[:, None], [(3, 4), (8,)], (8, 3),
     layout.DENSE, None),
])
def test_finds_the_layer_its_layout_and_its_bias(fn, leaf_shapes, x_shape,
                                                 spec, bias):
  analysis = _analyse(fn, leaf_shapes, x_shape)
  assert analysis.layers == {0: tracing_analysis.FoundLayer(spec, bias)}
  (site,) = analysis.sites.values()
  assert site.leaf == 0 and site.operand in (0, 1)
  assert analysis.reasons == {}


def test_conv_site_reduces_over_batch_and_space():
  analysis = _analyse(lambda w, x: _conv(x, w), [(3, 3, 2, 5)], (4, 6, 6, 2))
  (site,) = analysis.sites.values()
  assert (site.feature_axes, site.batch_axes, site.out_spatial) == (
      (3,), (0,), (1, 2))


@pytest.mark.parametrize('fn, leaf_shapes, reason', [
    (lambda v, x: x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True)),
     [(3, 4)],
     'transformed before its dot_general'),
    (lambda w, x: lax.cond(x[0, 0] > 0, lambda: x @ w, lambda: -x @ w),
     [(3, 4)], 'used as a kernel inside a cond'),
    (lambda w, x: x @ w + jnp.sum(w), [(3, 4)],
     'also used outside its dense/conv layers'),
    (lambda w, x: x @ w[0], [(2, 3, 4)], 'indexed or sliced before use'),
    (lambda w, x: x @ (w @ w.T), [(3, 3)],
     'both operands of a dot_general are computed from parameters'),
])
def test_says_why_a_parameter_is_passed_through(fn, leaf_shapes, reason):
  analysis = _analyse(fn, leaf_shapes, (8, 3))
  assert analysis.layers == {}
  assert any(reason in r for r in analysis.reasons[0]), analysis.reasons


def test_scan_closed_over_kernel_is_one_layer_and_sliced_stack_one_per_step():
  def fn(shared, stacked, x):
    def body(h, w):
      return jnp.tanh(h @ shared) @ w, None
    return lax.scan(body, x, stacked)[0]

  analysis = _analyse(fn, [(3, 3), (5, 3, 3)], (8, 3))
  assert analysis.layers == {
      0: tracing_analysis.FoundLayer(layout.DENSE, None),
      1: tracing_analysis.FoundLayer(layout.LayerSpec((), (1,), (0,)), None),
  }
  assert analysis.sliced == {1}
  # The scan body holds the sites, so the interpreter must enter it.
  assert len(analysis.active) == 2


def test_jit_and_remat_bodies_are_walked_as_if_inlined():
  inner = jax.checkpoint(lambda w, b, x: x @ w + b[None])
  fn = jax.jit(lambda w, b, x: inner(w, b, x))
  analysis = _analyse(fn, [(3, 4), (4,)], (8, 3))
  assert analysis.layers == {0: tracing_analysis.FoundLayer(layout.DENSE, 1)}
