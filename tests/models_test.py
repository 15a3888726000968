"""Tests of jaxembed.models: parameter counts against torchvision, shapes, dtypes, sharding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxembed import models


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_variables(module, size=32):
  # eval_shape: shapes only, nothing is computed, so even ResNet-50 costs milliseconds.
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def _model_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      name="resnet_tiny", stem="cifar", width_multiplier=1.0, stage_sizes=None, widths=None,
      hidden_dim=16, dtype="float32", pretrained=None, input_mean=None, input_std=None))
  c.update(overrides)
  return c


# Torchvision's parameter counts without the classifier (issue 4; fixtures/meta.json).
@pytest.mark.parametrize("name,kw,expected", [
    ("resnet18", {"stem": "cifar"}, 11_168_832),
    ("resnet18", {"stem": "imagenet"}, 11_176_512),
    ("resnet50", {"stem": "imagenet"}, 23_508_032),
])
def test_parameter_counts_match_torchvision(name, kw, expected):
  variables = _abstract_variables(models.create_backbone(name, **kw))
  assert _count(variables["params"]) == expected


def test_feature_dimensions():
  for name, dim in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]:
    module = models.create_backbone(name)
    out = jax.eval_shape(lambda m=module: m.init_with_output(
        jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)[0])
    assert out.shape == (2, dim) and out.dtype == jnp.float32, name


def test_resnet_tiny_accepts_any_number_of_stages():
  module = models.create_backbone("resnet_tiny", widths=(4, 8), stage_sizes=(1, 1))
  x = jnp.zeros((2, 8, 8, 1))
  variables = module.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"conv1", "bn1", "layer1_0", "layer2_0"}
  # Stride 2 at the start of the second stage only: 8x8 -> 4x4, so its conv sees 8x8 input.
  _, state = module.apply(variables, x, train=False, capture_intermediates=True,
                          mutable=["intermediates"])
  conv_out = state["intermediates"]["layer2_0"]["conv1"]["__call__"][0]
  assert conv_out.shape == (2, 4, 4, 8)
  assert module.apply(variables, x, train=False).shape == (2, 8)


def test_create_model_outputs_and_parameter_names():
  model = models.create_model(_model_config(widths=(4, 8), stage_sizes=(1, 1)), head_dim=2)
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "projector"}
  proj = variables["params"]["projector"]
  assert jax.tree.map(jnp.shape, proj) == {
      "hidden": {"kernel": (8, 16), "bias": (16,)}, "out": {"kernel": (16, 2), "bias": (2,)}}
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert {k: v.shape for k, v in out.items()} == {
      "features": (4, 8), "hidden": (4, 16), "z": (4, 2)}
  assert bool(jnp.all(out["hidden"] >= 0))
  # The projector, recomputed with NumPy from the features.
  f = np.asarray(out["features"], np.float64)
  h = np.maximum(f @ np.asarray(proj["hidden"]["kernel"]) + np.asarray(proj["hidden"]["bias"]), 0)
  z = h @ np.asarray(proj["out"]["kernel"]) + np.asarray(proj["out"]["bias"])
  np.testing.assert_allclose(out["hidden"], h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["z"], z, rtol=1e-5, atol=1e-5)
  # Training updates the BatchNorm statistics, whose tree has the same structure.
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


def test_input_normalisation():
  mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)
  normed = models.create_model(_model_config(input_mean=mean, input_std=std))
  plain = models.create_model(_model_config())
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  variables = plain.init(jax.random.key(0), x, train=False)
  x_norm = (np.asarray(x) - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(normed.apply(variables, x, train=False)["z"],
                             plain.apply(variables, jnp.asarray(x_norm), train=False)["z"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="one value per channel"):
    normed.apply(variables, jnp.zeros((2, 8, 8, 1)), train=False)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  cfg = _model_config(widths=(4, 8), stage_sizes=(1, 1))
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  model32 = models.create_model(cfg)
  cfg.dtype = "bfloat16"
  model16 = models.create_model(cfg)
  variables = model16.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out16 = model16.apply(variables, x, train=False)
  out32 = model32.apply(variables, x, train=False)
  assert all(v.dtype == jnp.float32 for v in out16.values())
  np.testing.assert_allclose(out16["features"], out32["features"], rtol=0.1, atol=0.05)


def test_bad_options_are_reported():
  with pytest.raises(ValueError, match="unknown backbone"):
    models.create_backbone("resnet19")
  with pytest.raises(ValueError, match="unknown stem"):
    models.create_backbone("resnet18", stem="tiny")
  with pytest.raises(ValueError, match="equal length|different numbers"):
    models.create_backbone("resnet_tiny", widths=(4, 8, 16), stage_sizes=(1, 1))
  with pytest.raises(ValueError, match="dtype"):
    models.create_backbone("resnet_tiny", dtype="float8")
