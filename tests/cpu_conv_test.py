"""The XLA:CPU convolution workaround equals lax.conv_general_dilated, values and gradients."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC,
                                  precision=lax.Precision.HIGHEST)


def _ours(x, w, strides, pads):
  return cpu_conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC,
                                       precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("size,kernel,stride,pad,path", [
    (2, 3, 1, 1, "products"),       # ResNet-18's last stage on 16-px inputs
    (4, 3, 2, 1, "products"),       # strided into a 2x2 output
    (3, 3, 1, 0, "products"),       # 1x1 output, no padding
    (16, 3, 1, 1, "filter_grad"),   # large output
    (17, 3, 2, 1, "xla"),           # 9x9 output, odd input
    (8, 1, 2, 0, "filter_grad"),    # 1x1 shortcut convolution
    (16, 5, 1, 2, "filter_grad"),
])
def test_values_and_gradients_equal_xla(size, kernel, stride, pad, path):
  rng = np.random.default_rng(size * 10 + kernel)
  x = jnp.asarray(rng.normal(size=(3, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)), jnp.float32)
  strides, pads = (stride, stride), ((pad, pad), (pad, pad))
  assert cpu_conv._path(x, w, strides, pads, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=NHWC, feature_group_count=1, batch_group_count=1,
                        precision=None, preferred_element_type=None) == path
  np.testing.assert_allclose(_ours(x, w, strides, pads), _reference(x, w, strides, pads),
                             rtol=1e-5, atol=1e-5)
  probe = jnp.asarray(rng.normal(size=_reference(x, w, strides, pads).shape), jnp.float32)
  grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, strides, pads) * probe),
                            argnums=(0, 1)))(x, w) for f in (_ours, _reference)]
  for ours, ref in zip(*grads):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_unusual_convolutions_go_to_xla():
  x = jnp.zeros((2, 2, 2, 4))
  common = dict(lhs_dilation=None, rhs_dilation=None, dimension_numbers=NHWC,
                batch_group_count=1, precision=None, preferred_element_type=None)
  w_grouped = jnp.zeros((3, 3, 1, 4))
  assert cpu_conv._path(x, w_grouped, (1, 1), ((1, 1), (1, 1)), feature_group_count=4,
                        **common) == "xla"
  assert cpu_conv._path(x, jnp.zeros((3, 3, 4, 4)), (1, 1), "SAME", feature_group_count=1,
                        **common) == "xla"
  dilated = dict(common, rhs_dilation=(2, 2))
  assert cpu_conv._path(x, jnp.zeros((3, 3, 4, 4)), (1, 1), ((2, 2), (2, 2)),
                        feature_group_count=1, **dilated) == "xla"


def test_resnet_gradients_equal_plain_xla_convolutions(monkeypatch):
  """A whole ResNet step: the workaround changes speed, not the gradients."""
  from jaxembed.configs import common
  from jaxembed import models
  c = common.get_config()
  c.model.name, c.model.widths, c.model.stage_sizes = "resnet_tiny", (4, 8, 8), (1, 1, 1)
  c.model.hidden_dim = 8
  model = models.create_model(c.model, head_dim=2)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x)

  def grads():
    def loss(p):
      out, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])
      return jnp.sum(out["z"] ** 2)
    return jax.grad(loss)(variables["params"])

  ours = grads()
  monkeypatch.setattr(cpu_conv, "_path", lambda *a, **k: "xla")
  ref = grads()
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
