"""A drop-in ``conv_general_dilated`` for Flax's ``nn.Conv`` that avoids two slow XLA:CPU paths.

Measured on two x86 cores with jax 0.10 (docs/BENCHMARKS.md, "Convolutions on
XLA:CPU"), XLA:CPU's convolutions are close to PyTorch's oneDNN ones except in
two cases that ResNets hit on small images:

* the filter gradient of a convolution with a large output (16x16 and up):
  at 32x32x64, batch 64, it takes 10x the forward pass (1.10 s vs 0.11 s),
  where PyTorch takes about as long as its forward;
* any 3x3 convolution whose output is at most 2x2 (ResNet-18's last stage on
  16-px inputs, the default digits model's last stage on 8-px inputs): 20-50x
  slower than the same FLOPs at other shapes (0.82 s for 1.2 GFLOP).

Both are computed here as sums of matrix products instead (one per kernel
offset: a strided slice of the padded input times that offset's (C, O)
matrix), which XLA:CPU runs as fast GEMMs: for large outputs only the filter
gradient (through ``jax.custom_vjp``; the forward pass and input gradient stay
XLA's convolutions), for tiny outputs everything. The results equal XLA's
convolution up to float rounding (tests/cpu_conv_test.py). Only models built
for CPUs use it (``resnet.torch_conv`` asks jaxembed.parallel.platform);
grouped or dilated convolutions and other layouts go to
``lax.conv_general_dilated`` unchanged, and parameters keep Flax's layout, so
checkpoints and imported weights do not depend on which path ran.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

# Outputs with at most this many positions (HxW) use products for everything.
TINY_OUTPUT = 4
# Outputs with at least this many positions use products for the filter gradient.
LARGE_OUTPUT = 256
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, with the slow XLA:CPU cases computed as matrix products."""
  args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)
  path = _path(lhs, rhs, window_strides, padding, **args)
  if path == "xla":
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
  strides = tuple(int(s) for s in window_strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if path == "products":
    return _conv_products(lhs, rhs, strides, pads, precision)
  return _conv_product_filter_grad(lhs, rhs, strides, pads, precision)


def _path(lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, precision, preferred_element_type):
  """'xla', 'products' (everything as matrix products) or 'filter_grad' (only the gradient)."""
  del precision
  if lhs.ndim != 4 or isinstance(padding, str):
    return "xla"
  if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
    return "xla"
  if any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1))):
    return "xla"
  if dimension_numbers is not None and (
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return "xla"
  positions = 1
  for size, k, s, (lo, hi) in zip(lhs.shape[1:3], rhs.shape[:2], window_strides, padding):
    positions *= (size + lo + hi - k) // s + 1
  kernel = rhs.shape[0] * rhs.shape[1]
  if kernel > 1 and positions <= TINY_OUTPUT:
    return "products"
  if kernel == 1 or positions >= LARGE_OUTPUT:
    return "filter_grad"
  return "xla"


def _conv_products(x, w, strides, pads, precision):
  """Convolution (NHWC, HWIO) as a sum over kernel offsets of (N*H*W, C) x (C, O) products."""
  kh, kw, c, _ = w.shape
  n = x.shape[0]
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (xp.shape[1] - kh) // strides[0] + 1
  ow = (xp.shape[2] - kw) // strides[1] + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0),
                         (n, i + (oh - 1) * strides[0] + 1, j + (ow - 1) * strides[1] + 1, c),
                         (1, strides[0], strides[1], 1))
      term = jnp.einsum("nhwc,co->nhwo", window, w[i, j], precision=precision)
      out = term if out is None else out + term
  return out


def _xla_conv(x, w, strides, pads, precision):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_product_filter_grad(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision)


def _fwd(x, w, strides, pads, precision):
  return _xla_conv(x, w, strides, pads, precision), (x, w)


def _bwd(strides, pads, precision, residuals, g):
  x, w = residuals
  _, input_grad = jax.vjp(lambda x_: _xla_conv(x_, w, strides, pads, precision), x)
  _, filter_grad = jax.vjp(lambda w_: _conv_products(x, w_, strides, pads, precision), w)
  return input_grad(g)[0], filter_grad(g)[0]


_conv_product_filter_grad.defvjp(_fwd, _bwd)
