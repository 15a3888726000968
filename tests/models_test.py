"""Tests of jaxembed.models: parameter counts against torchvision, shapes, dtypes, sharding.

Parameter values for forward passes are drawn with NumPy into the shapes that ``jax.eval_shape``
gives, which avoids compiling every initialiser (tens of seconds for an EfficientNet on CPU).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxembed import models
from jaxembed.models import efficientnet
from jaxembed.models import resnet


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_variables(module, shape=(1, 32, 32, 3), **kw):
  # eval_shape: shapes only, nothing is computed, so even ResNet-50 costs milliseconds.
  kw.setdefault("train", False)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), **kw))


def _random_variables(module, shape, seed=0, **kw):
  """He-scaled random parameters, non-trivial BatchNorm statistics, from NumPy."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ("mean", "bias"):
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(module, shape, **kw))


def _model_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      name="resnet_tiny", stem="cifar", width_multiplier=1.0, stage_sizes=None, widths=None,
      hidden_dim=16, dtype="float32", pretrained=None, input_mean=None, input_std=None))
  c.update(overrides)
  return c


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# Torchvision's parameter counts without the classifier (issue 4; shared/fixtures/meta.json).
@pytest.mark.parametrize("name,kw,expected", [
    ("resnet18", {"stem": "cifar"}, 11_168_832),
    ("resnet18", {"stem": "imagenet"}, 11_176_512),
    ("resnet50", {"stem": "imagenet"}, 23_508_032),
    ("efficientnet_b0", {}, 4_007_548),
    ("efficientnet_b3", {}, 10_696_232),
])
def test_parameter_counts_match_torchvision(name, kw, expected):
  variables = _abstract_variables(models.create_backbone(name, **kw))
  assert _count(variables["params"]) == expected


def test_feature_dimensions_and_registry():
  # Full-size feature widths (torchvision); the forward test below checks num_features against
  # real outputs at small width, the fixture tests against torchvision's at full width.
  expected = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet_tiny": 64,
              "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408,
              "efficientnet_b3": 1536}
  assert set(expected) <= set(models.BACKBONES)
  for name, dim in expected.items():
    assert models.create_backbone(name).num_features == dim, name
    assert models.NATURAL_IMAGE_SIZE[name] >= 32


def test_efficientnet_compound_scaling():
  # Published depth/width scaling (Tan & Le 2019) as torchvision rounds it: B3 stages have
  # ceil(1.4 * (1, 2, 2, 3, 3, 4, 1)) blocks and 8-rounded 1.2x widths.
  b3 = models.create_backbone("efficientnet_b3")
  assert [s.num_blocks for s in b3.stages] == [2, 3, 3, 5, 5, 6, 2]
  assert [s.out_channels for s in b3.stages] == [24, 32, 48, 96, 136, 232, 384]
  assert b3.stem_channels == 40 and b3.dropout_rate == 0.3
  assert models.create_backbone("efficientnet_b0").dropout_rate == 0.2
  assert [efficientnet.COMPOUND_SCALING[f"efficientnet_b{i}"][2] for i in range(4)] == [
      224, 240, 260, 300]


def test_strided_conv_pads_like_pytorch():
  # An even 6x6 input, 3x3 kernel, stride 2: PyTorch pads one pixel on every side ('SAME'
  # would pad only bottom/right). Reference computed with NumPy loops.
  conv = resnet.torch_conv(2, 3, strides=2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 6, 6, 3)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
  out = conv.apply({"params": {"kernel": kernel}}, x)
  padded = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  expected = np.array([[np.einsum("ijc,ijco->o", padded[2 * r:2 * r + 3, 2 * c:2 * c + 3], kernel)
                        for c in range(3)] for r in range(3)])
  np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def test_resnet_tiny_accepts_any_number_of_stages():
  module = models.create_backbone("resnet_tiny", widths=(4, 8), stage_sizes=(1, 2))
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  variables = _random_variables(module, x.shape)
  assert set(variables["params"]) == {"conv1", "bn1", "layer1_0", "layer2_0", "layer2_1"}
  # Stride 2 at the start of the second stage only: its first block halves 8x8 to 4x4.
  _, state = jax.jit(lambda v, x: module.apply(
      v, x, train=False, capture_intermediates=True, mutable=["intermediates"]))(variables, x)
  assert state["intermediates"]["layer1_0"]["__call__"][0].shape == (2, 8, 8, 4)
  assert state["intermediates"]["layer2_0"]["__call__"][0].shape == (2, 4, 4, 8)
  assert models.create_backbone("resnet_tiny").widths == (16, 32, 64)
  wide = models.create_backbone("resnet50", width_multiplier=0.25, widths=(8, 16),
                                stage_sizes=(1, 1))
  assert wide.num_features == 16  # round(16 * 0.25) * 4 (bottleneck expansion)


def test_create_model_outputs_and_parameter_names():
  model = models.create_model(_model_config(widths=(4, 8), stage_sizes=(1, 1)), head_dim=2)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  variables = _random_variables(model, x.shape)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "projector"}
  assert set(variables["batch_stats"]) == {"backbone"}
  proj = variables["params"]["projector"]
  assert jax.tree.map(jnp.shape, proj) == {
      "hidden": {"kernel": (8, 16), "bias": (16,)}, "out": {"kernel": (16, 2), "bias": (2,)}}
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      "features": ((4, 8), jnp.float32), "hidden": ((4, 16), jnp.float32),
      "z": ((4, 2), jnp.float32)}
  # The projector, recomputed with NumPy from the features.
  f = np.asarray(out["features"], np.float64)
  h = np.maximum(f @ np.asarray(proj["hidden"]["kernel"]) + np.asarray(proj["hidden"]["bias"]), 0)
  z = h @ np.asarray(proj["out"]["kernel"]) + np.asarray(proj["out"]["bias"])
  np.testing.assert_allclose(out["hidden"], h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-5)
  # Training moves the BatchNorm statistics by 0.1 of the batch's (PyTorch momentum 0.1).
  stem_in = np.asarray(x)  # the stem conv's input is x itself (no normalisation here)
  kernel = np.asarray(variables["params"]["backbone"]["conv1"]["kernel"])
  padded = np.pad(stem_in, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(np.einsum("bhwc,co->bhwo", padded[:, i:i + 8, j:j + 8], kernel[i, j])
             for i in range(3) for j in range(3))
  old_mean = variables["batch_stats"]["backbone"]["bn1"]["mean"]
  new_mean = updates["batch_stats"]["backbone"]["bn1"]["mean"]
  np.testing.assert_allclose(new_mean, 0.9 * old_mean + 0.1 * conv.mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_input_normalisation():
  mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)
  normed = models.create_model(_model_config(input_mean=mean, input_std=std, widths=(4,),
                                             stage_sizes=(1,)))
  plain = models.create_model(_model_config(widths=(4,), stage_sizes=(1,)))
  x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  variables = _random_variables(plain, x.shape)
  x_norm = (x - np.array(mean)) / np.array(std)
  apply = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  np.testing.assert_allclose(apply(normed, variables, x)["z"],
                             apply(plain, variables, x_norm.astype(np.float32))["z"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="one value per channel"):
    normed.apply(variables, jnp.zeros((2, 8, 8, 1)), train=False)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  cfg = _model_config(widths=(4, 8), stage_sizes=(1, 1))
  x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  model32 = models.create_model(cfg)
  cfg.dtype = "bfloat16"
  model16 = models.create_model(cfg)
  abstract = _abstract_variables(model16, x.shape)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
  variables = _random_variables(model32, x.shape)
  apply = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  out16, out32 = apply(model16, variables, x), apply(model32, variables, x)
  assert all(v.dtype == jnp.float32 for v in out16.values())
  np.testing.assert_allclose(out16["features"], out32["features"], rtol=0.1, atol=0.05)
  assert not np.array_equal(out16["features"], out32["features"])  # bf16 really was used


def test_stochastic_depth_drops_whole_examples():
  # With drop_prob 0.5 each example's output is either the shortcut x or x + branch / 0.5,
  # where the branch is that of the same block without dropping.
  block = efficientnet.MBConv(8, expand_ratio=2, kernel_size=3, strides=1, drop_prob=0.5)
  x = np.random.default_rng(0).standard_normal((32, 4, 4, 8)).astype(np.float32)
  variables = _random_variables(block, x.shape)
  run = jax.jit(lambda b, key: b.apply(variables, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": key})[0], static_argnums=0)
  branch = run(block.clone(drop_prob=0.0), jax.random.key(0)) - x
  out = np.asarray(run(block, jax.random.key(1)))
  kept = np.all(np.isclose(out, x + 2 * branch, atol=1e-4), axis=(1, 2, 3))
  dropped = np.all(np.isclose(out, x, atol=1e-6), axis=(1, 2, 3))
  assert np.all(kept ^ dropped) and 4 <= kept.sum() <= 28


def test_efficientnet_training_needs_a_dropout_key():
  net = models.create_backbone("efficientnet_b0", width_multiplier=0.1,
                               stage_sizes=(1,) * 7)
  variables = _random_variables(net, (2, 16, 16, 3))
  with pytest.raises(ValueError, match="dropout"):
    net.apply(variables, jnp.zeros((2, 16, 16, 3)), train=True, mutable=["batch_stats"])


def _tiny_kw(name):
  """Small widths; the full block structure for ResNets and EfficientNet-B0.

  B1..B3 differ from B0 only in width and depth (checked above by parameter counts and, with
  the fixtures, by torchvision's features), so they run one block per stage to save compile
  time.
  """
  if name == "efficientnet_b0":
    return {"width_multiplier": 0.1}, 16
  if name.startswith("efficientnet"):
    return {"width_multiplier": 0.1, "stage_sizes": (1,) * 7}, 16
  if name == "resnet_tiny":
    return {"widths": (4, 8, 8)}, 8
  return {"width_multiplier": 1 / 16, "stem": "cifar"}, 8


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_forward_with_the_batch_sharded_over_8_devices(name):
  mesh = _mesh()
  kw, size = _tiny_kw(name)
  net = models.create_backbone(name, **kw)
  x = np.random.default_rng(0).uniform(size=(16, size, size, 3)).astype(np.float32)
  variables = _random_variables(net, x.shape)
  batch = NamedSharding(mesh, P("data"))
  args = (jax.device_put(variables, NamedSharding(mesh, P())), jax.device_put(x, batch))
  forward = jax.jit(lambda v, x: net.apply(v, x, train=False), out_shardings=batch)
  # Unoptimised XLA code compiles faster; the numbers are the same up to rounding.
  out = forward.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
  assert out.shape == (16, net.num_features) and out.sharding.spec == P("data")
  assert np.all(np.isfinite(out)) and np.std(out) > 0


def test_sharded_training_forward_uses_global_batch_statistics():
  """Train mode on 8 devices = train mode on one: BatchNorm sees the global batch."""
  mesh = _mesh()
  net = models.create_backbone("resnet_tiny", widths=(4, 8), stage_sizes=(1, 1))
  x = np.random.default_rng(0).uniform(size=(16, 16, 16, 3)).astype(np.float32)
  variables = _random_variables(net, x.shape)
  step = lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
  batch = NamedSharding(mesh, P("data"))
  sharded = jax.jit(step)(jax.device_put(variables, NamedSharding(mesh, P())),
                          jax.device_put(x, batch))
  single = jax.jit(step)(jax.device_put(variables, jax.devices()[0]),
                         jax.device_put(x, jax.devices()[0]))
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_options_are_reported():
  with pytest.raises(ValueError, match="unknown backbone"):
    models.create_backbone("resnet19")
  with pytest.raises(ValueError, match="unknown stem"):
    models.create_backbone("resnet18", stem="tiny")
  with pytest.raises(ValueError, match="unknown stem"):
    models.create_backbone("efficientnet_b0", stem="tiny")
  with pytest.raises(ValueError, match="stages"):
    models.create_backbone("resnet_tiny", widths=(4, 8, 16), stage_sizes=(1, 1))
  with pytest.raises(ValueError, match="7 positive numbers"):
    models.create_backbone("efficientnet_b0", stage_sizes=(1, 1))
  with pytest.raises(ValueError, match="dtype"):
    models.create_backbone("resnet_tiny", dtype="float8")
  with pytest.raises(ValueError, match="width_multiplier"):
    models.create_backbone("resnet18", width_multiplier=0)
  with pytest.raises(TypeError, match="resnet18"):
    models.create_backbone("resnet18", depth=3)
  with pytest.raises(ValueError, match="NHWC"):
    models.create_backbone("resnet_tiny").init(jax.random.key(0), jnp.zeros((8, 8, 3)))
  assert isinstance(models.create_backbone("resnet_tiny"), nn.Module)
