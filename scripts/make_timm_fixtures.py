"""Writes tests/fixtures/timm: timm's own features for seeded random weights, for the import test.

Run in a separate environment with torch and timm (never a dependency of jaxembed; this script
imports nothing from it and no test imports this script):

  python scripts/make_timm_fixtures.py [--out tests/fixtures/timm] [--models resnet18,...]

For each model, timm's full ``state_dict`` key list (classifier and ``num_batches_tracked``
included, as a user's file has them) is filled by ``tests/fixtures/timm/recipe.py`` from a seed,
loaded into timm's model, and run in eval mode in float32 on a seeded (2, 3, 64, 64) input.
Written per model: ``<model>.json`` (the key list with shapes and dtypes, seed, recipe version,
versions, weight digest) and ``<model>.npz`` (``input_nchw``, ``features``: the pooled features,
i.e. the output of ``timm.create_model(model, num_classes=0)``). The weights themselves are not
stored: the test regenerates them with NumPy from the key list and seed.
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch

MODELS = ("resnet18", "resnet34", "resnet50",
          "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3")
INPUT_SHAPE = (2, 3, 64, 64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "timm")
_TORCHVISION_OPS = None  # keeps the stand-in schemas of import_timm alive


def load_recipe(folder):
  """tests/fixtures/timm/recipe.py, by path (it needs NumPy only)."""
  spec = importlib.util.spec_from_file_location("timm_fixture_recipe",
                                                os.path.join(folder, "recipe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def import_timm():
  """Imports timm, working around a torchvision whose compiled ops do not load.

  timm imports torchvision at import time. PyPI's torchvision for torch 2.13 is a CUDA build;
  beside the CPU torch its ``_C`` extension does not load, and its import then fails defining
  fake kernels for two ops it never declared ("operator torchvision::nms does not exist").
  timm's ResNets and EfficientNets use no torchvision op, so the two schemas are declared
  (without kernels) and the import is repeated.
  """
  global _TORCHVISION_OPS
  try:
    import timm  # pylint: disable=g-import-not-at-top
    return timm
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
    del sys.modules[name]
  _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")  # pylint: disable=no-member
  for op in ("nms", "qnms"):
    _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  import timm  # pylint: disable=g-import-not-at-top
  return timm


def stage_scales(model, x):
  """Standard deviation of each stage's output (layer1.. / blocks.N), to show the scales hold."""
  stages = [(n, m) for n, m in model.named_children() if n.startswith("layer")]
  if hasattr(model, "blocks"):
    stages = [(f"blocks.{i}", m) for i, m in enumerate(model.blocks)]
  scales, hooks = {}, []
  for name, module in stages:
    hooks.append(module.register_forward_hook(
        lambda _m, _i, out, name=name: scales.__setitem__(name, float(out.std()))))
  model(x)
  for h in hooks:
    h.remove()
  return scales


def make_fixture(timm, recipe, name, seed, out_dir):
  """Writes <name>.json and <name>.npz; returns a summary for the table."""
  full = timm.create_model(name, pretrained=False)
  entries = [(k, list(v.shape), str(v.dtype).removeprefix("torch."))
             for k, v in full.state_dict().items()]
  weights = recipe.make_state_dict(entries, seed)
  model = timm.create_model(name, pretrained=False, num_classes=0).eval()
  # num_classes=0 has no classifier: load everything else, strictly.
  classifier = set(full.state_dict()) - set(model.state_dict())
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()
                         if k not in classifier}, strict=True)
  x = np.random.default_rng(seed + 1).standard_normal(INPUT_SHAPE).astype(np.float32)
  with torch.no_grad():
    features = model(torch.from_numpy(x)).numpy()
    # The same as the full model's pooled features before its classifier.
    full.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    pre_logits = full.eval().forward_head(full.forward_features(torch.from_numpy(x)),
                                          pre_logits=True).numpy()
    np.testing.assert_array_equal(features, pre_logits)
    scales = stage_scales(model, torch.from_numpy(x))
  meta = {
      "model": name, "timm": timm.__version__, "torch": torch.__version__,
      "recipe_version": recipe.RECIPE_VERSION, "seed": seed, "input_seed": seed + 1,
      "input_shape": list(INPUT_SHAPE), "features_shape": list(features.shape),
      "classifier_keys": sorted(classifier), "weights_sha256": recipe.digest(weights),
      "state_dict": entries,
  }
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    # One field, and one state-dict entry, per line: readable, and diffs stay small.
    fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta.items() if k != "state_dict"]
    rows = ",\n  ".join(json.dumps(e) for e in entries)
    f.write("{\n " + ",\n ".join(fields) + f',\n "state_dict": [\n  {rows}\n ]\n}}\n')
  np.savez(os.path.join(out_dir, f"{name}.npz"), input_nchw=x, features=features)
  return {"keys": len(entries), "features": features.shape,
          "max_abs": float(np.abs(features).max()), "std": float(features.std()),
          "stage_std": scales}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=FIXTURES)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--seed", type=int, default=2100, help="model i gets seed + 10 i")
  args = parser.parse_args()
  torch.manual_seed(0)
  os.makedirs(args.out, exist_ok=True)
  timm = import_timm()
  recipe = load_recipe(FIXTURES)
  print(f"torch {torch.__version__}, timm {timm.__version__}, recipe {recipe.RECIPE_VERSION}")
  for name in args.models.split(","):
    seed = args.seed + 10 * MODELS.index(name)
    s = make_fixture(timm, recipe, name, seed, args.out)
    stages = " ".join(f"{v:.2g}" for v in s["stage_std"].values())
    print(f"{name:16s} seed {seed}  {s['keys']:4d} keys  features {s['features']}  "
          f"max|f| {s['max_abs']:.3g}  std {s['std']:.3g}  stage std {stages}")


if __name__ == "__main__":
  main()
