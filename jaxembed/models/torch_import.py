"""Import of PyTorch ResNet/EfficientNet weights (torchvision's or timm's keys) into Flax.

A user's trained network, its ``state_dict`` saved as .safetensors, .npz or (where torch is
installed) .pt/.pth, becomes the Flax backbone's ``{"params": ..., "batch_stats": ...}``,
BatchNorm running statistics included, so it can start t-SimCNE or serve directly for feature
export. Layout changes: conv kernels (out, in, kh, kw) -> (kh, kw, in, out); BatchNorm
weight/bias/running_mean/running_var -> scale/bias/mean/var. Which key names which variable,
in torchvision's or timm's layout (told apart by the keys), is in
:mod:`jaxembed.models.torch_layouts`. Dropped, and reported in one line: the classifier
(``fc.*``, ``classifier.*``, ``head.*``), ``num_batches_tracked``, and the ``module.``
(DataParallel, DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes.

Export from PyTorch with e.g.
``safetensors.torch.save_file(model.state_dict(), "model.safetensors")`` or
``numpy.savez("model.npz", **{k: v.numpy() for k, v in model.state_dict().items()})``;
``convert_command`` converts a .pt/.pth file where torch is installed.
"""

import dataclasses
import functools
import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from jaxembed.models import efficientnet
from jaxembed.models import registry
from jaxembed.models import resnet
from jaxembed.models import torch_layouts

_LEAF_NAMES = {
    ("params", "kernel"): "weight", ("params", "scale"): "weight",
    ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_CLASSIFIER = re.compile(r"^(fc|classifier|head)\.")
# Wrapper prefixes, stripped from the front of a key in any order: DataParallel and
# DistributedDataParallel add "module.", torch.compile's OptimizedModule "_orig_mod.".
_PREFIXES = ("module.", "_orig_mod.")
# Keys of common checkpoint dicts that hold the state dict (training scripts, timm's train.py).
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_TORCH_FILES = (".pt", ".pth")
_SHOWN_KEYS = 10  # keys listed per kind of mismatch


class TorchRequiredError(ValueError):
  """A .pt/.pth file and no torch to read it; the message says how to convert the file."""


def convert_command(src: str = "model.pth", dst: str = "model.safetensors",
                    trusted: bool = False) -> str:
  """A shell one-liner that converts a PyTorch pickle into a .safetensors state dict.

  It unwraps {"state_dict" | "model_state_dict" | "model": ...}, keeps the floating-point
  tensors (``num_batches_tracked`` is dropped on import anyway) and copies each into its own
  contiguous storage, since ``safetensors`` refuses non-contiguous tensors and tensors that
  share memory; as float32, the dtype of the import.

  Args:
    src: the .pt/.pth file.
    dst: the .safetensors file to write.
    trusted: add ``weights_only=False``, which runs the pickle's code: only for a trusted file
      whose extra entries (e.g. an argparse.Namespace) torch's safe loader refuses.
  """
  load_args = f"{src!r}, map_location='cpu'" + (", weights_only=False" if trusted else "")
  return (
      'python -c "import torch, safetensors.torch as st; '
      f"d = torch.load({load_args}); "
      f"d = next((d[k] for k in {_WRAPPERS!r} if k in d), d); "
      "st.save_file({k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True) "
      "for k, v in d.items() if torch.is_tensor(v) and v.is_floating_point()}, "
      f'{dst!r})"')


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a state dict saved as .safetensors, .npz or .pt/.pth into {key: numpy array}.

  Raises:
    TorchRequiredError: a .pt/.pth file where torch is not installed.
    ValueError: a missing or unreadable file, or one that holds no state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no weight file at {path!r}")
  if path.endswith(".safetensors"):
    return dict(st_numpy.load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  if path.endswith(_TORCH_FILES):
    return _read_torch_pickle(path)
  raise ValueError(
      f"cannot read {path!r}: give a .safetensors, .npz, .pt or .pth state dict. From PyTorch: "
      "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")


def _read_torch_pickle(path: str) -> Dict[str, np.ndarray]:
  """torch.load with weights_only=True (no code from the file runs), then the state dict."""
  safetensors_path = os.path.splitext(path)[0] + ".safetensors"
  try:
    # Optional: torch is not a dependency (and takes 4.5 s to import).
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise TorchRequiredError(
        f"{path} is a PyTorch pickle and torch is not installed here to read it; convert it "
        f"where torch is installed: {convert_command(path, safetensors_path)} and set "
        "model.pretrained to the .safetensors file") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(_refused_pickle_message(torch, path, safetensors_path, e)) from None
  except (RuntimeError, EOFError, OSError) as e:
    raise ValueError(f"torch cannot read {path}: {_first_line(e)}") from None
  state = _unwrap(obj, path, torch.is_tensor)
  out = {}
  for key, value in state.items():
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype != torch.float32:
      value = value.float()  # torch's .numpy() refuses bfloat16; the import casts to float32
    out[key] = value.numpy()
  return out


def _refused_pickle_message(torch, path, safetensors_path, error) -> str:
  """Why torch's safe loader refused ``path``: a whole pickled model, or other objects."""
  try:
    # torch >= 2.5 lists the classes a checkpoint needs without running its code.
    names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:  # pylint: disable=broad-except
    names = []
  modules = [n for n in names if n.startswith("torch.nn.modules.")]
  if modules:
    model = next((n for n in names if not n.startswith("torch.")), modules[0])
    return (f"{path} holds a whole pickled model ({model}), not a state dict; in PyTorch save "
            "its weights with torch.save(model.state_dict(), 'model.pth') or "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and import "
            "that file")
  what = ", ".join(names[:3]) if names else _first_line(error)
  return (f"torch's safe loader (weights_only=True) refused {path}: it holds {what}; if you "
          f"trust the file, convert it: {convert_command(path, safetensors_path, trusted=True)}")


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _unwrap(obj, path: str, is_tensor) -> Mapping[str, Any]:
  """The {name: tensor} state dict in a loaded object, possibly under a wrapper key."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict "
                     "({name: tensor}); save model.state_dict()")
  if not (obj and all(is_tensor(v) for v in obj.values())):
    inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      raise ValueError(
          f"{path} holds a dict with keys {list(obj)[:8]} and no state dict in it: expected "
          f"{{name: tensor}}, or one under {' / '.join(map(repr, _WRAPPERS))}")
    obj = inner
  if not obj:
    raise ValueError(f"{path}: the state dict is empty")
  others = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not is_tensor(v)]
  if others:
    raise ValueError(f"{path}: the state dict holds entries that are not tensors: "
                     f"{', '.join(others[:5])}")
  return obj


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What an import took and what it dropped.

  Attributes:
    layout: "torchvision" or "timm"; "torchvision/timm" for a ResNet (the same keys); None
      before the layout is known.
    tensors: tensors imported (after dropping).
    prefixes: wrapper prefixes removed from the keys, e.g. ("module.",).
    classifier: (key, shape) of each classifier key dropped, in natural key order.
    counters: ``num_batches_tracked`` entries dropped (BatchNorm step counters).
  """
  layout: Optional[str] = None
  tensors: int = 0
  prefixes: Tuple[str, ...] = ()
  classifier: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
  counters: int = 0

  def dropped(self) -> str:
    """What was dropped, in words; "" if nothing but step counters was.

    E.g. "dropped 2 classifier keys (fc.bias (5,), fc.weight (5, 512)) and the 'module.'
    prefix".
    """
    parts = []
    if self.classifier:
      shown = [f"{k} {s}" for k, s in self.classifier[:4]]
      more = ", ..." if len(self.classifier) > 4 else ""
      n = len(self.classifier)
      parts.append(f"{n} classifier key{'s' * (n != 1)} ({', '.join(shown)}{more})")
    if self.prefixes:
      names = " and ".join(repr(p) for p in self.prefixes)
      parts.append(f"the {names} prefix{'es' * (len(self.prefixes) > 1)}")
    return f"dropped {' and '.join(parts)}" if parts else ""

  def __str__(self):
    dropped = self.dropped()
    return (f"imported {self.tensors} tensors ({self.layout} layout)"
            + (f"; {dropped}" if dropped else ""))


def clean_state_dict(state_dict: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], ImportReport]:
  """Drops wrapper prefixes, the classifier and ``num_batches_tracked``, and says what went.

  Returns:
    (the remaining {key: array}, an ``ImportReport`` without the layout).
  """
  out, prefixes, classifier, counters = {}, [], [], 0
  for key, value in state_dict.items():
    stripped = True
    while stripped:
      stripped = False
      for prefix in _PREFIXES:
        if key.startswith(prefix):
          key, stripped = key[len(prefix):], True
          if prefix not in prefixes:
            prefixes.append(prefix)
    if key.endswith("num_batches_tracked"):
      counters += 1
    elif _CLASSIFIER.match(key):
      classifier.append((key, tuple(np.shape(value))))
    else:
      out[key] = np.asarray(value)
  # Sorted, so that a file gives the same line whichever format stored it (safetensors sorts).
  classifier = tuple(sorted(classifier, key=lambda entry: _natural_order(entry[0])))
  report = ImportReport(tensors=len(out), prefixes=tuple(prefixes), classifier=classifier,
                        counters=counters)
  return out, report


def torch_layout(variables, backbone, layout: str = torch_layouts.TORCHVISION
                 ) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """Maps each PyTorch key of ``backbone`` to (Flax path incl. collection, torch shape).

  Args:
    variables: the backbone's variables (or their shapes, from ``jax.eval_shape``).
    backbone: the unbound module.
    layout: "torchvision" or "timm" (the same keys for a ResNet).
  """
  if layout not in torch_layouts.LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {torch_layouts.LAYOUTS}")
  if isinstance(backbone, resnet.ResNet):
    module_key = lambda path: torch_layouts.resnet_module_key(path)  # noqa: E731
  elif isinstance(backbone, efficientnet.EfficientNet):
    module_key = lambda path: torch_layouts.efficientnet_module_key(  # noqa: E731
        path, variables["params"], layout)
  else:
    raise TypeError(f"no PyTorch layout known for {type(backbone).__name__}")
  keys = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})))
    for path, leaf in flat.items():
      key = module_key(path[:-1]) + "." + _LEAF_NAMES[(collection, path[-1])]
      shape = tuple(leaf.shape)
      if len(shape) == 4:  # Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:  # Dense (in, out) -> Linear (out, in)
        shape = shape[::-1]
      keys[key] = ((collection,) + path, shape)
  return keys


def _natural_order(key: str):
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key)]


def _listing(title: str, items) -> str:
  shown = list(items[:_SHOWN_KEYS])
  more = [f"... and {len(items) - _SHOWN_KEYS} more"] if len(items) > _SHOWN_KEYS else []
  return f"{title} ({len(items)}): " + ("; ".join(shown + more) if items else "none")


def mismatch_message(state: Mapping[str, np.ndarray], layout: Mapping[str, Any],
                     layout_name: str, backbone_name: Optional[str] = None) -> Optional[str]:
  """The error for a cleaned state dict that does not fit a backbone's layout; None if it fits.

  Names the first missing keys (with the shapes the model expects), the first unexpected keys
  (with the file's shapes) and the first shape mismatches (key, expected, got), and says what
  network the keys look like and which config builds it.
  """
  # The file's keys in its own order (a network's, in a PyTorch state dict); the model's
  # missing ones in natural order (layer2 before layer10).
  missing = sorted(set(layout) - set(state), key=_natural_order)
  unexpected = [k for k in state if k not in layout]
  misshaped = [k for k in state if k in layout and tuple(np.shape(state[k])) != layout[k][1]]
  if not (missing or unexpected or misshaped):
    return None
  target = f"backbone {backbone_name!r}" if backbone_name else "the backbone"
  lines = [
      f"the state dict does not fit {target} (compared in {layout_name} layout): "
      f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys",
      _listing("missing", [f"{k} {layout[k][1]}" for k in missing]),
      _listing("unexpected", [f"{k} {tuple(np.shape(state[k]))}" for k in unexpected]),
      _listing("mis-shaped", [f"{k}: expected {layout[k][1]}, got {tuple(np.shape(state[k]))}"
                              for k in misshaped]),
  ]
  recognised = torch_layouts.recognise({k: np.shape(v) for k, v in state.items()})
  if recognised is not None:
    lines.append(f"hint: {recognised.hint()}")
  else:
    lines.append("hint: the keys look like neither torchvision's nor timm's ResNet or "
                 "EfficientNet; check model.name, stem, width_multiplier, stage_sizes and widths")
  return "\n".join(lines)


@functools.lru_cache(maxsize=16)
def _abstract_variables(backbone, image_channels: int):
  """The backbone's variable shapes; cached, as tracing an EfficientNet-B3's init takes seconds
  on a CPU (2.4 s here) and the modules are hashable dataclasses."""
  return jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, image_channels)), train=False))


def convert_state_dict(state_dict: Mapping[str, Any], backbone, image_channels: int = 3,
                       backbone_name: Optional[str] = None):
  """Converts a torchvision- or timm-layout state dict into ``backbone``'s Flax variables.

  Args:
    state_dict: {key: array}, e.g. from ``read_state_dict``; the layout is read off the keys.
    backbone: an unbound module from ``create_backbone``.
    image_channels: input channels of the model (taken from the stem weight if present).
    backbone_name: the backbone's registry name, for the error message.

  Returns:
    (``{"params": ..., "batch_stats": ...}`` of float32 arrays, an ``ImportReport``).

  Raises:
    ValueError: naming missing, unexpected and mis-shaped keys if the state dict does not fit,
      with the network the keys look like.
  """
  state, report = clean_state_dict(state_dict)
  for key in torch_layouts.STEM_KEYS:
    if key in state and state[key].ndim == 4:
      image_channels = int(state[key].shape[1])
  layout_name = torch_layouts.detect_layout(state) or torch_layouts.TORCHVISION
  layout = torch_layout(_abstract_variables(backbone, image_channels), backbone, layout_name)
  message = mismatch_message(state, layout, layout_name, backbone_name)
  if message:
    raise ValueError(message)
  flat = {}
  for key, (path, _) in layout.items():
    value = np.asarray(state[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    flat[path] = value
  # device_put moves the arrays as they are; jnp.asarray would compile a conversion per shape.
  variables = jax.device_put(flax.traverse_util.unflatten_dict(flat))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  if isinstance(backbone, resnet.ResNet):
    layout_name = torch_layouts.RESNET_LAYOUT
  return variables, dataclasses.replace(report, layout=layout_name)


def load_torch_state_dict(path: str, backbone_name: str, **kw) -> Dict[str, Any]:
  """Loads a PyTorch state dict file into the Flax backbone ``backbone_name``.

  Logs one line saying what was imported and what was dropped (absl: a warning where a
  classifier or a prefix was dropped, else INFO).

  Args:
    path: a .safetensors, .npz or .pt/.pth file holding the network's ``state_dict()``, in
      torchvision's or timm's layout.
    backbone_name: a key of ``models.BACKBONES`` (e.g. "resnet18", "efficientnet_b3").
    **kw: options of ``create_backbone`` (stem, width_multiplier, stage_sizes, widths, ...);
      they must describe the saved network (torchvision's ResNets have stem="imagenet").

  Returns:
    ``{"params": ..., "batch_stats": ...}`` for the backbone subtree: put them at
    ``variables["params"]["backbone"]`` and ``variables["batch_stats"]["backbone"]`` of a
    ``create_model`` model, or apply them to ``create_backbone(backbone_name, **kw)``.

  Raises:
    ValueError: (``TorchRequiredError`` for a .pt/.pth file without torch) with the path.
  """
  backbone = registry.create_backbone(backbone_name, **kw)
  try:
    variables, report = convert_state_dict(read_state_dict(path), backbone,
                                           backbone_name=backbone_name)
  except TorchRequiredError:
    raise
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  # A warning where keys were dropped: absl shows warnings, not INFO, on a command line's
  # stderr by default, and the user should see that part of the file went unused.
  log = logging.warning if report.dropped() else logging.info
  log("%s: %s", os.fspath(path), report)
  return variables


def load_pretrained(variables: Dict[str, Any], model_config) -> Dict[str, Any]:
  """Puts the weights of ``model_config.pretrained`` into a ``create_model`` model's variables.

  Args:
    variables: ``{"params": {"backbone", "projector"}, "batch_stats": {"backbone"}}``.
    model_config: ``config.model``; ``pretrained`` names the state dict file
      (.safetensors/.npz/.pt/.pth), and name/stem/width options describe the saved network.

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
