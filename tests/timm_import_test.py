"""Import of timm state dicts, checked against timm's own features (tests/fixtures/timm).

Each fixture holds timm's real state-dict key list (classifier and ``num_batches_tracked``
included), a seed, and the features timm computed for the weights that
tests/fixtures/timm/recipe.py draws from that seed (scripts/make_timm_fixtures.py, run with
torch and timm; see the README there). Here the same weights are drawn with NumPy alone.

Every model's keys and shapes are imported and recognised; the features are compared for a
subset (each compile of a full-size backbone costs seconds on a 2-core CI): set
JAXEMBED_TIMM_FEATURES=all to compare all seven.
"""

import functools
import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from jaxembed import models
from jaxembed.models import torch_import
from jaxembed.models import torch_layouts

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "timm"
MODELS = ("resnet18", "resnet34", "resnet50",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
# resnet18: timm's ResNet (torchvision's keys), the quickest to compile. efficientnet_b2: both
# timm block types (depthwise-separable, with a skip in its 2-block first stage, and inverted
# residual) and width 1.1, whose rounded channels (stem 32, head 1408) differ from a plain
# scaling. The others only change depth, width or block type, which the key and shape checks
# cover; all seven matched to 2e-6 of the feature scale (JAXEMBED_TIMM_FEATURES=all).
FEATURE_MODELS = (MODELS if os.environ.get("JAXEMBED_TIMM_FEATURES") == "all"
                  else ("resnet18", "efficientnet_b2"))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _load_recipe():
  spec = importlib.util.spec_from_file_location("timm_fixture_recipe", FIXTURES / "recipe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


RECIPE = _load_recipe()


@functools.lru_cache(maxsize=None)
def _fixture(name):
  """(meta from <name>.json, timm's state dict regenerated from its seed)."""
  meta = json.loads((FIXTURES / f"{name}.json").read_text())
  assert meta["recipe_version"] == RECIPE.RECIPE_VERSION, (
      f"{name}.json was made by recipe {meta['recipe_version']}: rerun "
      "scripts/make_timm_fixtures.py")
  state = RECIPE.make_state_dict(meta["state_dict"], meta["seed"])
  # The weights timm ran, bit for bit (NumPy's generator streams could change one day).
  assert RECIPE.digest(state) == meta["weights_sha256"], f"{name}: regenerated weights differ"
  return meta, state


@pytest.mark.parametrize("name", MODELS)
def test_every_timm_layout_imports_and_is_recognised(name):
  meta, state = _fixture(name)
  backbone = models.create_backbone(name, stem="imagenet")
  variables, report = torch_import.convert_state_dict(state, backbone, backbone_name=name)
  # Every key but the classifier and the step counters became a variable, none was left over.
  assert report.tensors == len(jax.tree.leaves(variables))
  assert report.tensors == len(meta["state_dict"]) - len(meta["classifier_keys"]) - report.counters
  assert report.counters == sum(k.endswith("num_batches_tracked") for k, _, _ in meta["state_dict"])
  assert sorted(k for k, _ in report.classifier) == meta["classifier_keys"]
  efficient = name.startswith("efficientnet")
  assert report.layout == ("timm" if efficient else "torchvision/timm")
  assert str(report).startswith(f"imported {report.tensors} tensors ({report.layout} layout); "
                                "dropped 2 classifier keys (")
  # Recognised from timm's real key names and shapes alone.
  shapes = {k: s for k, s, _ in meta["state_dict"]}
  recognised = torch_layouts.recognise(torch_import.clean_state_dict(shapes)[0])
  assert recognised.config["name"] == name
  assert recognised.layout == ("timm" if efficient else "torchvision/timm")
  assert recognised.unsupported is None


_COMPILED = {}


def _features(name, variables, x):
  """The backbone's eval-mode features; one compile per backbone and input shape."""
  net = models.create_backbone(name, stem="imagenet")
  if (net, x.shape) not in _COMPILED:
    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    _COMPILED[net, x.shape] = forward.lower(variables, x).compile(compiler_options=FAST_COMPILE)
  return np.asarray(_COMPILED[net, x.shape](variables, x))


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_imported_timm_weights_reproduce_timm_features(name, tmp_path):
  """Through the public loader and a file, as a user would: timm's keys, classifier and all."""
  _, state = _fixture(name)
  np.savez(tmp_path / f"{name}.npz", **state)
  variables = models.load_torch_state_dict(tmp_path / f"{name}.npz", name, stem="imagenet")
  io = np.load(FIXTURES / f"{name}.npz")
  got = _features(name, variables, io["input_nchw"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  expected = io["features"]
  # 1e-4 relative to the scale of the features (single entries near 0 have no relative scale).
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_timm_efficientnet_into_another_variant_names_the_right_one():
  _, state = _fixture("efficientnet_b2")
  with pytest.raises(ValueError) as info:
    torch_import.convert_state_dict(state, models.create_backbone("efficientnet_b0"),
                                    backbone_name="efficientnet_b0")
  message = str(info.value)
  assert "does not fit backbone 'efficientnet_b0' (compared in timm layout)" in message
  # Missing and unexpected keys are named in the file's (timm's) layout, with shapes.
  assert "unexpected (" in message and "blocks.0.1.conv_dw.weight (16, 1, 3, 3)" in message
  assert ("mis-shaped (238): blocks.2.0.conv_pwl.weight: expected (40, 144, 1, 1), got "
          "(48, 144, 1, 1)") in message
  assert message.endswith("in timm layout; jaxembed builds it with model.name='efficientnet_b2'")


def test_timm_resnet50_into_resnet18_names_resnet50():
  _, state = _fixture("resnet50")
  with pytest.raises(ValueError, match=r"(?s)unexpected \(\d+\): layer1\.0\.conv3\.weight "
                     r"\(256, 64, 1, 1\).*holds resnet50 \(ResNet with bottleneck blocks "
                     r"\(3, 4, 6, 3\).*model.name='resnet50', model.stem='imagenet'"):
    torch_import.convert_state_dict(state, models.create_backbone("resnet18"))


def test_timm_variants_jaxembed_does_not_build_are_named():
  """resnet50d's deep stem and average-pool shortcut, and an EfficientNet without SE."""
  meta, _ = _fixture("resnet18")
  shapes = {k: tuple(s) for k, s, _ in meta["state_dict"] if k != "conv1.weight"}
  deep = dict(shapes, **{"conv1.0.weight": (32, 3, 3, 3), "conv1.3.weight": (32, 32, 3, 3)})
  assert "deep 3-convolution stem" in torch_layouts.recognise(deep).unsupported
  meta, _ = _fixture("efficientnet_b0")
  lite = {k: tuple(s) for k, s, _ in meta["state_dict"] if ".se." not in k}
  assert "no squeeze-excitation" in torch_layouts.recognise(lite).unsupported
  with pytest.raises(ValueError, match="which jaxembed does not build: no squeeze-excitation"):
    torch_import.convert_state_dict({k: np.zeros(s, np.float32) for k, s in lite.items()},
                                    models.create_backbone("efficientnet_b0"))


def test_layout_detection_on_real_keys():
  for name in MODELS:
    keys = [k for k, _, _ in _fixture(name)[0]["state_dict"]]
    expected = "timm" if name.startswith("efficientnet") else "torchvision"
    assert torch_layouts.detect_layout(keys) == expected, name
  assert torch_layouts.detect_layout(["features.0.0.weight"]) == "torchvision"
  assert torch_layouts.detect_layout(["encoder.weight"]) is None
