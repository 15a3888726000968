"""Tests of jaxembed.models.torch_import: torchvision state dicts into Flax backbones.

The fixture tests compare with features that torchvision itself computed
(../shared/fixtures, see its README.md); they skip when the fixtures are absent.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from jaxembed import models
from jaxembed.models import torch_import

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _features(net, variables, x):
  forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
  return np.asarray(forward.lower(variables, x).compile(compiler_options=FAST_COMPILE)(
      variables, x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b3"])
def test_imported_weights_reproduce_torchvision_features(shared_fixtures, name):
  variables = models.load_torch_state_dict(shared_fixtures / f"{name}.safetensors", name,
                                           stem="imagenet")
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  io = np.load(shared_fixtures / f"{name}_io.npz")
  x = io["input_nchw"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  got = _features(models.create_backbone(name, stem="imagenet"), variables, x)
  expected = io["features"]
  # 1e-4 relative to the scale of the features (single entries near 0 have no relative scale).
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_npz_prefix_classifier_and_running_statistics(shared_fixtures, tmp_path):
  """An .npz export with a DataParallel prefix and the classifier loads like the original."""
  state = st_numpy.load_file(shared_fixtures / "resnet18.safetensors")
  extra = {"fc.weight": np.zeros((10, 512), np.float32), "fc.bias": np.zeros(10, np.float32),
           "bn1.num_batches_tracked": np.array(3)}
  np.savez(tmp_path / "r18.npz", **{f"module.{k}": v for k, v in {**state, **extra}.items()})
  variables = models.load_torch_state_dict(tmp_path / "r18.npz", "resnet18")
  # Layout, checked entry by entry against the file.
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"][2, 5, 1, 7],
                                state["conv1.weight"][7, 1, 2, 5].astype(np.float32))
  bs = variables["batch_stats"]["layer2_0"]["downsample_bn"]
  np.testing.assert_array_equal(bs["var"], state["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(bs["mean"], state["layer2.0.downsample.1.running_mean"])
  np.testing.assert_array_equal(variables["params"]["layer4_1"]["bn2"]["scale"],
                                state["layer4.1.bn2.weight"])


def test_efficientnet_layout(shared_fixtures):
  state = st_numpy.load_file(shared_fixtures / "efficientnet_b0.safetensors")
  variables = models.load_torch_state_dict(shared_fixtures / "efficientnet_b0.safetensors",
                                           "efficientnet_b0")
  p = variables["params"]
  # Stage 1 has no expansion: depthwise is block.0, SE block.1, projection block.2.
  np.testing.assert_array_equal(p["stage1_0"]["se"]["reduce"]["bias"],
                                state["features.1.0.block.1.fc1.bias"])
  # Depthwise kernels: torch (C, 1, kh, kw) -> Flax (kh, kw, 1, C).
  np.testing.assert_array_equal(p["stage2_0"]["depthwise"]["conv"]["kernel"][0, 2, 0, 5],
                                state["features.2.0.block.1.0.weight"][5, 0, 0, 2])
  np.testing.assert_array_equal(p["head"]["bn"]["bias"], state["features.8.1.bias"])


def _tiny_torch_state_dict():
  """Zeros in the torchvision layout of a small ResNet (shapes by hand, as torchvision has)."""
  sd = {"conv1.weight": (4, 3, 3, 3)}
  bn = lambda p, c: {f"{p}.{n}": (c,) for n in ("weight", "bias", "running_mean",  # noqa: E731
                                                 "running_var")}
  sd.update(bn("bn1", 4))
  sd.update({"layer1.0.conv1.weight": (4, 4, 3, 3), "layer1.0.conv2.weight": (4, 4, 3, 3),
             **bn("layer1.0.bn1", 4), **bn("layer1.0.bn2", 4),
             "layer2.0.conv1.weight": (8, 4, 3, 3), "layer2.0.conv2.weight": (8, 8, 3, 3),
             **bn("layer2.0.bn1", 8), **bn("layer2.0.bn2", 8),
             "layer2.0.downsample.0.weight": (8, 4, 1, 1), **bn("layer2.0.downsample.1", 8)})
  return {k: np.full(s, 0.5, np.float32) for k, s in sd.items()}


TINY = {"widths": (4, 8), "stage_sizes": (1, 1)}


def test_tiny_state_dict_loads_without_fixtures(tmp_path):
  st_numpy.save_file(_tiny_torch_state_dict(), str(tmp_path / "tiny.safetensors"))
  variables = models.load_torch_state_dict(tmp_path / "tiny.safetensors", "resnet_tiny", **TINY)
  expected = jax.eval_shape(lambda: models.create_backbone("resnet_tiny", **TINY).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(lambda a: a.shape, dict(expected))
  assert all(np.all(np.asarray(a) == 0.5) for a in jax.tree.leaves(variables))


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  sd = _tiny_torch_state_dict()
  del sd["layer1.0.bn2.running_var"]
  sd["layer3.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  sd["layer2.0.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  st_numpy.save_file(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError) as info:
    models.load_torch_state_dict(tmp_path / "bad.safetensors", "resnet_tiny", **TINY)
  message = str(info.value)
  assert "missing (1): layer1.0.bn2.running_var" in message
  assert "unexpected (1): layer3.0.conv1.weight" in message
  assert "mis-shaped (1): layer2.0.conv2.weight: file (8, 8, 5, 5), model (8, 8, 3, 3)" in message


def test_wrong_stem_gets_a_hint(tmp_path):
  sd = _tiny_torch_state_dict()
  sd["conv1.weight"] = np.zeros((4, 3, 7, 7), np.float32)
  np.savez(tmp_path / "stem.npz", **sd)
  with pytest.raises(ValueError, match="stem='imagenet'"):
    models.load_torch_state_dict(tmp_path / "stem.npz", "resnet_tiny", **TINY)


def test_unreadable_files_are_reported(tmp_path):
  with pytest.raises(ValueError, match="no weight file"):
    models.load_torch_state_dict(tmp_path / "absent.safetensors", "resnet18")
  (tmp_path / "model.pt").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
    models.load_torch_state_dict(tmp_path / "model.pt", "resnet18")


def test_load_pretrained_replaces_the_backbone_only(tmp_path):
  st_numpy.save_file(_tiny_torch_state_dict(), str(tmp_path / "tiny.safetensors"))
  cfg = ml_collections.ConfigDict(dict(
      name="resnet_tiny", stem="cifar", width_multiplier=1.0, stage_sizes=(1, 1), widths=(4, 8),
      hidden_dim=16, dtype="float32", pretrained=str(tmp_path / "tiny.safetensors"),
      input_mean=None, input_std=None))
  model = models.create_model(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               train=False))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dict(abstract))
  loaded = models.load_pretrained(variables, cfg)
  assert all(np.all(np.asarray(a) == 0.5) for a in jax.tree.leaves(loaded["params"]["backbone"]))
  assert all(np.all(np.asarray(a) == 0.5) for a in jax.tree.leaves(loaded["batch_stats"]))
  assert all(np.all(a == 0) for a in jax.tree.leaves(loaded["params"]["projector"]))
  cfg.pretrained = None
  assert models.load_pretrained(variables, cfg) is variables
  # Gray images cannot take a stem trained on colour: a clear message, not a shape error later.
  gray = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                           train=False))
  cfg.pretrained = str(tmp_path / "tiny.safetensors")
  with pytest.raises(ValueError, match="channels"):
    models.load_pretrained(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), dict(gray)), cfg)
  assert torch_import.clean_state_dict({"module.fc.weight": 1, "classifier.1.bias": 2}) == {}
