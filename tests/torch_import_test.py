"""Tests of jaxembed.models.torch_import: PyTorch state dicts into Flax backbones.

The fixture tests compare with features that torchvision itself computed
(../shared/fixtures, see its README.md); they skip when the fixtures are absent. timm's layouts
are tested in timm_import_test.py. The .pt/.pth tests that need torch skip without it; the
message for a missing torch is tested everywhere by hiding torch.
"""

import argparse
import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from jaxembed import cli
from jaxembed import models
from jaxembed.models import torch_import

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED = {}


def _features(net, variables, x):
  """Eval-mode features; one compile per backbone and input shape (several tests share it)."""
  if (net, x.shape) not in _COMPILED:
    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    _COMPILED[net, x.shape] = forward.lower(variables, x).compile(compiler_options=FAST_COMPILE)
  return np.asarray(_COMPILED[net, x.shape](variables, x))


def _assert_features_match(got, expected):
  # 1e-4 relative to the scale of the features (single entries near 0 have no relative scale).
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b3"])
def test_imported_weights_reproduce_torchvision_features(shared_fixtures, name):
  variables = models.load_torch_state_dict(shared_fixtures / f"{name}.safetensors", name,
                                           stem="imagenet")
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  io = np.load(shared_fixtures / f"{name}_io.npz")
  x = io["input_nchw"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  got = _features(models.create_backbone(name, stem="imagenet"), variables, x)
  _assert_features_match(got, io["features"])


def test_npz_prefix_classifier_and_running_statistics(shared_fixtures, tmp_path):
  """An .npz export with a DataParallel prefix and the classifier loads like the original."""
  state = st_numpy.load_file(shared_fixtures / "resnet18.safetensors")
  extra = {"fc.weight": np.zeros((10, 512), np.float32), "fc.bias": np.zeros(10, np.float32),
           "bn1.num_batches_tracked": np.array(3)}
  np.savez(tmp_path / "r18.npz", **{f"module.{k}": v for k, v in {**state, **extra}.items()})
  variables, report = torch_import.convert_state_dict(
      torch_import.read_state_dict(tmp_path / "r18.npz"), models.create_backbone("resnet18"))
  assert report.dropped() == ("dropped 2 classifier keys (fc.bias (10,), fc.weight (10, 512)) "
                              "and the 'module.' prefix")
  assert (report.layout, report.tensors, report.counters) == ("torchvision/timm", len(state), 1)
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


def test_bfloat16_safetensors_load(tmp_path):
  from safetensors import flax as st_flax  # pylint: disable=g-import-not-at-top
  sd = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _tiny_torch_state_dict().items()}
  st_flax.save_file(sd, str(tmp_path / "bf16.safetensors"))
  variables = models.load_torch_state_dict(tmp_path / "bf16.safetensors", "resnet_tiny", **TINY)
  assert all(a.dtype == jnp.float32 and np.all(np.asarray(a) == 0.5)
             for a in jax.tree.leaves(variables))


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  sd = _tiny_torch_state_dict()
  del sd["layer1.0.bn2.running_var"]
  sd["layer3.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  sd["layer2.0.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  st_numpy.save_file(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError) as info:
    models.load_torch_state_dict(tmp_path / "bad.safetensors", "resnet_tiny", **TINY)
  lines = str(info.value).splitlines()
  assert lines[0] == (f"{tmp_path / 'bad.safetensors'}: the state dict does not fit backbone "
                      "'resnet_tiny' (compared in torchvision layout): 1 missing, 1 unexpected, "
                      "1 mis-shaped keys")
  assert lines[1] == "missing (1): layer1.0.bn2.running_var (4,)"
  assert lines[2] == "unexpected (1): layer3.0.conv1.weight (8, 8, 3, 3)"
  assert lines[3] == ("mis-shaped (1): layer2.0.conv2.weight: expected (8, 8, 3, 3), "
                      "got (8, 8, 5, 5)")
  # What the keys look like: the blocks the file has (layer3 included), the stem.
  assert lines[4].startswith("hint: the file holds ResNet with basic blocks (1, 1, 1), widths "
                             "(4, 8, 8) and a 3x3 stem in torchvision/timm layout")


def test_long_listings_are_cut_and_say_how_many_more():
  sd = _tiny_torch_state_dict()
  sd.update({f"extra.{i}.weight": np.zeros(2, np.float32) for i in range(12)})
  with pytest.raises(ValueError, match=r"unexpected \(12\): extra\.0\.weight \(2,\); .*"
                     r"extra\.9\.weight \(2,\); \.\.\. and 2 more\n"):
    torch_import.convert_state_dict(sd, models.create_backbone("resnet_tiny", **TINY))


def test_wrong_stem_gets_a_hint(tmp_path):
  sd = _tiny_torch_state_dict()
  sd["conv1.weight"] = np.zeros((4, 3, 7, 7), np.float32)
  np.savez(tmp_path / "stem.npz", **sd)
  with pytest.raises(ValueError) as info:
    models.load_torch_state_dict(tmp_path / "stem.npz", "resnet_tiny", **TINY)
  message = str(info.value)
  assert "conv1.weight: expected (4, 3, 3, 3), got (4, 3, 7, 7)" in message
  assert message.splitlines()[-1] == (
      "hint: the file holds ResNet with basic blocks (1, 1), widths (4, 8) and a 7x7 stem in "
      "torchvision/timm layout; jaxembed builds it with model.name='resnet18', "
      "model.stem='imagenet', model.stage_sizes=(1, 1), model.widths=(4, 8), "
      "model.width_multiplier=1.0")


def test_a_resnet_file_for_an_efficientnet_names_the_resnet(shared_fixtures):
  state = st_numpy.load_file(shared_fixtures / "resnet50.safetensors")
  with pytest.raises(ValueError) as info:
    torch_import.convert_state_dict(state, models.create_backbone("efficientnet_b0"),
                                    backbone_name="efficientnet_b0")
  message = str(info.value)
  assert "missing (309): features.0.0.weight (32, 3, 3, 3); features.0.1.bias (32,)" in message
  # safetensors stores keys sorted, so the file's order is alphabetical here.
  assert "unexpected (265): bn1.bias (64,); bn1.running_mean (64,)" in message
  assert message.endswith("jaxembed builds it with model.name='resnet50', model.stem='imagenet'")


def test_unreadable_files_are_reported(tmp_path):
  with pytest.raises(ValueError, match="no weight file"):
    models.load_torch_state_dict(tmp_path / "absent.safetensors", "resnet18")
  (tmp_path / "model.ckpt").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"\.safetensors, \.npz, \.pt or \.pth"):
    models.load_torch_state_dict(tmp_path / "model.ckpt", "resnet18")


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



def test_prefixes_classifier_and_counters_are_dropped_and_reported():
  state = {"_orig_mod.module.conv1.weight": np.zeros((4, 3, 3, 3)),
           "module._orig_mod.bn1.num_batches_tracked": np.array(5),
           "module.fc.weight": np.zeros((5, 64)), "module.fc.bias": np.zeros(5),
           "module.head.fc.weight": np.zeros((3, 64)), "classifier.1.bias": np.zeros(3),
           "classifier.1.weight": np.zeros((3, 64))}
  cleaned, report = torch_import.clean_state_dict(state)
  assert list(cleaned) == ["conv1.weight"]
  assert report.counters == 1 and report.tensors == 1 and report.layout is None
  assert report.dropped() == (
      "dropped 5 classifier keys (classifier.1.bias (3,), classifier.1.weight (3, 64), "
      "fc.bias (5,), fc.weight (5, 64), ...) and the '_orig_mod.' and 'module.' prefixes")
  assert torch_import.ImportReport(tensors=3, layout="timm").dropped() == ""
  assert str(torch_import.ImportReport(tensors=3, layout="timm")) == (
      "imported 3 tensors (timm layout)")


def test_the_import_logs_what_it_dropped(tmp_path, caplog):
  sd = {f"module.{k}": v for k, v in _tiny_torch_state_dict().items()}
  sd["module.fc.weight"] = np.zeros((5, 8), np.float32)
  st_numpy.save_file(sd, str(tmp_path / "tiny.safetensors"))
  caplog.set_level(logging.INFO, logger="absl")
  models.load_torch_state_dict(tmp_path / "tiny.safetensors", "resnet_tiny", **TINY)
  # A warning, which the command lines show (absl hides INFO there).
  logged = [(r.levelname, r.getMessage()) for r in caplog.records if "imported" in r.getMessage()]
  assert logged == [
      ("WARNING", f"{tmp_path / 'tiny.safetensors'}: imported {len(sd) - 1} tensors "
       "(torchvision/timm layout); dropped 1 classifier key (fc.weight (5, 8)) and the 'module.' "
       "prefix")]
  caplog.clear()
  st_numpy.save_file(_tiny_torch_state_dict(), str(tmp_path / "clean.safetensors"))
  models.load_torch_state_dict(tmp_path / "clean.safetensors", "resnet_tiny", **TINY)
  assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
      ("INFO", f"{tmp_path / 'clean.safetensors'}: imported 30 tensors (torchvision/timm layout)")]


# ------------------------------------------------------------------ .pt / .pth files


def _hide_torch(monkeypatch):
  """Makes ``import torch`` fail here, as where torch is not installed."""
  monkeypatch.setitem(sys.modules, "torch", None)


def test_pt_file_without_torch_says_how_to_convert(tmp_path, monkeypatch, capsys):
  _hide_torch(monkeypatch)
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read")
  with pytest.raises(torch_import.TorchRequiredError) as info:
    models.load_torch_state_dict(path, "resnet18")
  message = str(info.value)
  assert isinstance(info.value, ValueError) and "\n" not in message
  assert message.startswith(f"{path} is a PyTorch pickle and torch is not installed here")
  assert torch_import.convert_command(str(path), str(tmp_path / "model.safetensors")) in message
  # The command lines turn it into one line on stderr and exit status 2.
  def main(_):
    models.load_torch_state_dict(path, "resnet18")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(main, argv=["prog"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == f"error: {message}\n"


def test_convert_command_text():
  assert torch_import.convert_command() == (
      'python -c "import torch, safetensors.torch as st; '
      "d = torch.load('model.pth', map_location='cpu'); "
      "d = next((d[k] for k in ('state_dict', 'model_state_dict', 'model') if k in d), d); "
      "st.save_file({k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True) "
      "for k, v in d.items() if torch.is_tensor(v) and v.is_floating_point()}, "
      "'model.safetensors')\"")


def _torch_state_dict(torch):
  """The tiny ResNet's state dict as torch tensors, one of them non-contiguous, one bfloat16,
  plus a classifier and a step counter as a real export has them."""
  sd = {k: torch.from_numpy(v.copy()) for k, v in _tiny_torch_state_dict().items()}
  sd["layer2.0.conv1.weight"] = torch.rand(4, 8, 3, 3).transpose(0, 1)  # (8, 4, 3, 3), strided
  sd["bn1.running_var"] = torch.full((4,), 0.75, dtype=torch.bfloat16)
  sd["bn1.num_batches_tracked"] = torch.tensor(7)
  sd["fc.weight"], sd["fc.bias"] = torch.zeros(5, 8), torch.zeros(5)
  return sd


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict"])
def test_pt_files_with_torch(tmp_path, wrapper):
  torch = pytest.importorskip("torch")
  sd = _torch_state_dict(torch)
  obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
  torch.save(obj, tmp_path / "model.pt")
  variables = models.load_torch_state_dict(tmp_path / "model.pt", "resnet_tiny", **TINY)
  kernel = variables["params"]["layer2_0"]["conv1"]["kernel"]
  np.testing.assert_array_equal(kernel, sd["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], np.full(4, 0.75))


def test_pickled_whole_model_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), tmp_path / "whole.pth")
  with pytest.raises(ValueError, match=r"holds a whole pickled model \(torch\.nn\.modules\..*\), "
                     r"not a state dict; in PyTorch save its weights with "
                     r"torch\.save\(model\.state_dict\(\), 'model\.pth'\)"):
    torch_import.read_state_dict(tmp_path / "whole.pth")
  torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
  with pytest.raises(ValueError, match="keys \\['epoch'\\] and no state dict in it"):
    torch_import.read_state_dict(tmp_path / "no_weights.pth")


def test_printed_conversion_commands_work(tmp_path, monkeypatch):
  """The one-liners in the messages, run as printed: a wrapper, a non-contiguous tensor,
  bfloat16 and two keys on one storage (which safetensors refuses to save as they are)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("safetensors.torch")
  sd = _torch_state_dict(torch)
  sd["layer1.0.bn2.bias"] = sd["layer1.0.bn1.bias"]
  torch.save({"model": sd, "epoch": 3}, tmp_path / "model.pth")
  # An argparse.Namespace beside the weights (as training scripts save) needs a trusted load.
  torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "trusted.pth")
  direct = models.load_torch_state_dict(tmp_path / "model.pth", "resnet_tiny", **TINY)
  with pytest.raises(ValueError, match="refused .*trusted.pth: it holds argparse.Namespace; if "
                     "you trust the file, convert it: python -c") as refused:
    torch_import.read_state_dict(tmp_path / "trusted.pth")
  with monkeypatch.context() as m:
    _hide_torch(m)
    with pytest.raises(torch_import.TorchRequiredError) as no_torch:
      torch_import.read_state_dict(tmp_path / "model.pth")
  for message, name in ((str(refused.value), "trusted"), (str(no_torch.value), "model")):
    code = re.search(r'python -c "([^"]*)"', message).group(1)
    subprocess.run([sys.executable, "-c", code], check=True)
    converted = models.load_torch_state_dict(tmp_path / f"{name}.safetensors", "resnet_tiny",
                                             **TINY)
    jax.tree.map(np.testing.assert_array_equal, converted, direct)


# ------------------------------------------------ the user's case: a trained classifier


def test_trained_efficientnet_with_classifier_and_prefix(shared_fixtures, tmp_path, caplog):
  """torchvision's EfficientNet-B0 fine-tuned to 5 classes and saved from DataParallel."""
  state = st_numpy.load_file(shared_fixtures / "efficientnet_b0.safetensors")
  rng = np.random.default_rng(0)
  trained = {**state, "classifier.1.weight": rng.normal(size=(5, 1280)).astype(np.float32),
             "classifier.1.bias": rng.normal(size=5).astype(np.float32)}
  trained = {f"module.{k}": v for k, v in trained.items()}
  st_numpy.save_file(trained, str(tmp_path / "b0.safetensors"))
  np.savez(tmp_path / "b0.npz", **trained)
  files = ["b0.safetensors", "b0.npz"]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in trained.items()}},
               tmp_path / "b0.pth")
    files.append("b0.pth")
  except ImportError:
    pass  # .pth without torch: test_pt_file_without_torch_says_how_to_convert
  io = np.load(shared_fixtures / "efficientnet_b0_io.npz")
  x = io["input_nchw"].transpose(0, 2, 3, 1)
  net = models.create_backbone("efficientnet_b0", stem="imagenet")
  caplog.set_level(logging.INFO, logger="absl")
  for name in files:
    variables = models.load_torch_state_dict(tmp_path / name, "efficientnet_b0")
    _assert_features_match(_features(net, variables, x), io["features"])
  expected = (f"imported {len(state)} tensors (torchvision layout); dropped 2 classifier keys "
              "(classifier.1.bias (5,), classifier.1.weight (5, 1280)) and the 'module.' prefix")
  assert [r.getMessage() for r in caplog.records if "imported" in r.getMessage()] == [
      f"{tmp_path / name}: {expected}" for name in files]
