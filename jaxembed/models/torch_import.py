"""Import of torchvision-layout PyTorch weights (``state_dict`` as .safetensors or .npz).

A user's trained ResNet or EfficientNet (torchvision's module names) becomes the Flax
backbone's ``{"params": ..., "batch_stats": ...}``, BatchNorm running statistics included, so it
can start t-SimCNE or serve directly for feature export. Layout changes: conv kernels
(out, in, kh, kw) -> (kh, kw, in, out); BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var. The classifier (``fc.*``, ``classifier.*``), ``num_batches_tracked`` and a
``module.`` prefix (DataParallel) are dropped.

Export from PyTorch with e.g.
``safetensors.torch.save_file(model.state_dict(), "model.safetensors")`` or
``numpy.savez("model.npz", **{k: v.numpy() for k, v in model.state_dict().items()})``.
"""

import os
import re
from typing import Any, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.models import efficientnet
from jaxembed.models import registry
from jaxembed.models import resnet

_LEAF_NAMES = {
    ("params", "kernel"): "weight", ("params", "scale"): "weight",
    ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_CLASSIFIER = re.compile(r"^(fc|classifier)\.")
# The first convolution, whose input channels decide the image channels of the Flax model.
_STEM_KEYS = ("conv1.weight", "features.0.0.weight")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state dict saved as .safetensors or .npz into {key: numpy array}."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no weight file at {path!r}")
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
    return dict(st_numpy.load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  raise ValueError(
      f"cannot read {path!r}: give a .safetensors or .npz state dict. From PyTorch: "
      "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")


def clean_state_dict(state_dict: Dict[str, Any]) -> Dict[str, np.ndarray]:
  """Drops the classifier, ``num_batches_tracked`` and a ``module.`` prefix."""
  out = {}
  for key, value in state_dict.items():
    if key.startswith("module."):
      key = key[len("module."):]
    if key.endswith("num_batches_tracked") or _CLASSIFIER.match(key):
      continue
    out[key] = np.asarray(value)
  return out


def _resnet_module_path(path: Tuple[str, ...], _) -> str:
  parts = []
  for name in path:
    m = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if m:
      parts.append(f"layer{m.group(1)}.{m.group(2)}")
    elif name == "downsample_conv":
      parts.append("downsample.0")
    elif name == "downsample_bn":
      parts.append("downsample.1")
    else:
      parts.append(name)
  return ".".join(parts)


def _efficientnet_module_path(path: Tuple[str, ...], params) -> str:
  conv_bn = {"conv": "0", "bn": "1"}
  # The final 1x1 conv follows the last stage in torchvision's ``features`` Sequential.
  head_index = 1 + max(int(m.group(1)) for m in (re.fullmatch(r"stage(\d+)_\d+", k)
                                                  for k in params) if m)
  top = path[0]
  if top == "stem":
    return f"features.0.{conv_bn[path[1]]}"
  if top == "head":
    return f"features.{head_index}.{conv_bn[path[1]]}"
  m = re.fullmatch(r"stage(\d+)_(\d+)", top)
  if not m:
    raise ValueError(f"unexpected EfficientNet module {top!r}")
  # torchvision's MBConv.block is a Sequential: [expand], depthwise, se, project.
  order = (["expand"] if "expand" in params[top] else []) + ["depthwise", "se", "project"]
  index = order.index(path[1])
  prefix = f"features.{m.group(1)}.{m.group(2)}.block.{index}"
  if path[1] == "se":
    return f"{prefix}.{ {'reduce': 'fc1', 'expand': 'fc2'}[path[2]] }"
  return f"{prefix}.{conv_bn[path[2]]}"


def torch_layout(variables, backbone) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """Maps each torchvision key of ``backbone`` to (Flax path incl. collection, torch shape)."""
  if isinstance(backbone, resnet.ResNet):
    module_path = _resnet_module_path
  elif isinstance(backbone, efficientnet.EfficientNet):
    module_path = _efficientnet_module_path
  else:
    raise TypeError(f"no torchvision layout known for {type(backbone).__name__}")
  layout = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
    for path, leaf in flat.items():
      key = module_path(path[:-1], variables["params"]) + "." + _LEAF_NAMES[
          (collection, path[-1])]
      shape = tuple(leaf.shape)
      if len(shape) == 4:  # Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:  # Dense (in, out) -> Linear (out, in)
        shape = shape[::-1]
      layout[key] = ((collection,) + path, shape)
  return layout


def convert_state_dict(state_dict: Dict[str, Any], backbone, image_channels: int = 3):
  """Converts a torchvision state dict into ``backbone``'s Flax variables.

  Args:
    state_dict: {torchvision key: array}, e.g. from ``read_state_dict``.
    backbone: an unbound module from ``create_backbone``.
    image_channels: input channels of the model (taken from the stem weight if present).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 arrays.

  Raises:
    ValueError: listing missing, unexpected and mis-shaped keys if the state dict does not fit.
  """
  state_dict = clean_state_dict(state_dict)
  for key in _STEM_KEYS:
    if key in state_dict and state_dict[key].ndim == 4:
      image_channels = int(state_dict[key].shape[1])
  abstract = jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, image_channels)), train=False))
  layout = torch_layout(abstract, backbone)
  missing = sorted(set(layout) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(layout))
  misshaped = sorted(f"{k}: file {tuple(state_dict[k].shape)}, model {layout[k][1]}"
                     for k in set(layout) & set(state_dict)
                     if tuple(state_dict[k].shape) != layout[k][1])
  if missing or unexpected or misshaped:
    def listing(title, items):
      shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
      return f"{title} ({len(items)}): " + (", ".join(shown) if items else "none")
    hint = ""
    if any(m.startswith("conv1.weight:") for m in misshaped):
      hint = " (the stem differs: 7x7 conv1 is stem='imagenet', 3x3 is stem='cifar')"
    raise ValueError(
        "the state dict does not fit the backbone; check the backbone name, stem, "
        f"width_multiplier, stage_sizes and widths{hint}.\n"
        + "\n".join([listing("missing", missing), listing("unexpected", unexpected),
                     listing("mis-shaped", misshaped)]))
  flat = {}
  for key, (path, _) in layout.items():
    value = np.asarray(state_dict[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    flat[path] = value
  # device_put moves the arrays as they are; jnp.asarray would compile a conversion per shape.
  variables = jax.device_put(flax.traverse_util.unflatten_dict(flat))
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_torch_state_dict(path: str, backbone_name: str, **kw) -> Dict[str, Any]:
  """Loads a torchvision-layout state dict file into the Flax backbone ``backbone_name``.

  Args:
    path: a .safetensors or .npz file holding the model's ``state_dict()``.
    backbone_name: a key of ``models.BACKBONES`` (e.g. "resnet18", "efficientnet_b3").
    **kw: options of ``create_backbone`` (stem, width_multiplier, stage_sizes, widths, ...);
      they must describe the saved network (torchvision's ResNets have stem="imagenet").

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for the backbone subtree: put them at
    ``variables["params"]["backbone"]`` and ``variables["batch_stats"]["backbone"]`` of a
    ``create_model`` model, or apply them to ``create_backbone(backbone_name, **kw)``.
  """
  backbone = registry.create_backbone(backbone_name, **kw)
  try:
    return convert_state_dict(read_state_dict(path), backbone)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_pretrained(variables: Dict[str, Any], model_config) -> Dict[str, Any]:
  """Puts the weights of ``model_config.pretrained`` into a ``create_model`` model's variables.

  Args:
    variables: ``{"params": {"backbone", "projector"}, "batch_stats": {"backbone"}}``.
    model_config: ``config.model``; ``pretrained`` names the .safetensors/.npz state dict, and
      name/stem/width options describe the saved network.

  Returns:
    A copy of ``variables`` whose backbone parameters and BatchNorm statistics are imported;
    the projector is kept.
  """
  path = getattr(model_config, "pretrained", None)
  if not path:
    return variables
  loaded = load_torch_state_dict(path, model_config.name, **registry.backbone_kwargs(model_config))
  for collection in ("params", "batch_stats"):
    old = variables.get(collection, {}).get("backbone", {})
    old_shapes = jax.tree.map(lambda a: tuple(a.shape), old)
    new_shapes = jax.tree.map(lambda a: tuple(a.shape), loaded[collection])
    if old_shapes != new_shapes:
      raise ValueError(
          f"{path}: the imported {collection} do not match the model's backbone; the image "
          "channels probably differ from the saved network's (set config.data.channels to the "
          "channels it was trained on, usually 3)")
  params = dict(variables["params"], backbone=loaded["params"])
  batch_stats = dict(variables.get("batch_stats", {}), backbone=loaded["batch_stats"])
  return dict(variables, params=params, batch_stats=batch_stats)
