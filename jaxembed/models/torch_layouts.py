"""Key layouts of PyTorch ResNet/EfficientNet state dicts: torchvision's and timm's.

Names every variable of a jaxembed backbone by its key in either layout, and tells from a
state dict's keys and shapes which layout and which network it holds (and the jaxembed config
that builds that network), for the import in :mod:`jaxembed.models.torch_import`.

timm's ResNets (``resnet18/34/50``) use torchvision's keys. timm's EfficientNets
(``efficientnet_b0`` .. ``b3``, timm 1.0) have other keys but the same network as torchvision's
and jaxembed's: stem and head widths, SiLU, squeeze-excitation to a quarter of the block's input
channels, BatchNorm eps 1e-5 and PyTorch's symmetric padding; tests/timm_import_test.py checks
the features against timm's. timm's ``tf_efficientnet_*`` use the same keys as
``efficientnet_*`` but TensorFlow's asymmetric 'SAME' padding and BatchNorm eps 1e-3, which
jaxembed does not build; the keys cannot tell them apart.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from jaxembed.models import efficientnet
from jaxembed.models import registry
from jaxembed.models import resnet

TORCHVISION = "torchvision"
TIMM = "timm"
LAYOUTS = (TORCHVISION, TIMM)
# How a ResNet's layout is reported: timm's ResNets use torchvision's keys.
RESNET_LAYOUT = f"{TORCHVISION}/{TIMM}"

# The first convolution of each layout; its input channels are the image channels.
STEM_KEYS = ("conv1.weight", "features.0.0.weight", "conv_stem.weight")

# timm's EfficientNet block modules by jaxembed's (MBConv sub-module, conv or bn). Blocks with
# expansion are timm's InvertedResidual; the first stage's blocks (no expansion) are its
# DepthwiseSeparableConv, whose BatchNorms are numbered from the depthwise one.
_TIMM_INVERTED_RESIDUAL = {
    ("expand", "conv"): "conv_pw", ("expand", "bn"): "bn1",
    ("depthwise", "conv"): "conv_dw", ("depthwise", "bn"): "bn2",
    ("project", "conv"): "conv_pwl", ("project", "bn"): "bn3",
}
_TIMM_DEPTHWISE_SEPARABLE = {
    ("depthwise", "conv"): "conv_dw", ("depthwise", "bn"): "bn1",
    ("project", "conv"): "conv_pw", ("project", "bn"): "bn2",
}
_TIMM_SE = {"reduce": "se.conv_reduce", "expand": "se.conv_expand"}
_TIMM_ENDS = {("stem", "conv"): "conv_stem", ("stem", "bn"): "bn1",
              ("head", "conv"): "conv_head", ("head", "bn"): "bn2"}
# torchvision: Conv2dNormActivation's conv and BatchNorm are its entries 0 and 1.
_CONV_BN_INDEX = {"conv": "0", "bn": "1"}


def resnet_module_key(path: Tuple[str, ...]) -> str:
  """A ResNet module's key prefix (torchvision's, which timm's ResNets share)."""
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


def efficientnet_module_key(path: Tuple[str, ...], params: Mapping[str, Any],
                            layout: str) -> str:
  """An EfficientNet module's key prefix in ``layout``.

  Args:
    path: the Flax module path, e.g. ("stage2_0", "depthwise", "conv").
    params: the model's "params" tree (tells which blocks have an expansion).
    layout: "torchvision" or "timm".
  """
  top = path[0]
  m = re.fullmatch(r"stage(\d+)_(\d+)", top)
  if layout == TIMM:
    if not m:
      return _TIMM_ENDS[path]
    block = f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"
    if path[1] == "se":
      return f"{block}.{_TIMM_SE[path[2]]}"
    table = _TIMM_INVERTED_RESIDUAL if "expand" in params[top] else _TIMM_DEPTHWISE_SEPARABLE
    return f"{block}.{table[path[1:]]}"
  if top == "stem":
    return f"features.0.{_CONV_BN_INDEX[path[1]]}"
  if top == "head":  # the final 1x1 conv follows the last stage in torchvision's ``features``
    last = max(int(s.group(1)) for s in (re.fullmatch(r"stage(\d+)_\d+", k) for k in params) if s)
    return f"features.{last + 1}.{_CONV_BN_INDEX[path[1]]}"
  if not m:
    raise ValueError(f"unexpected EfficientNet module {top!r}")
  # torchvision's MBConv.block is a Sequential: [expand], depthwise, se, project.
  order = (["expand"] if "expand" in params[top] else []) + ["depthwise", "se", "project"]
  prefix = f"features.{m.group(1)}.{m.group(2)}.block.{order.index(path[1])}"
  if path[1] == "se":
    return f"{prefix}.{ {'reduce': 'fc1', 'expand': 'fc2'}[path[2]] }"
  return f"{prefix}.{_CONV_BN_INDEX[path[2]]}"


def detect_layout(keys) -> Optional[str]:
  """The layout, "timm" or "torchvision", of a cleaned state dict's keys; None if neither.

  Only EfficientNets differ; a ResNet is reported as "torchvision" (timm's has the same keys).
  """
  keys = list(keys)
  if any(k.startswith(("conv_stem.", "blocks.", "conv_head.")) for k in keys):
    return TIMM
  if any(k.startswith(("features.", "conv1.", "layer")) for k in keys):
    return TORCHVISION
  return None


@dataclasses.dataclass(frozen=True)
class Recognised:
  """What network a state dict holds.

  Attributes:
    layout: "torchvision", "timm", or "torchvision/timm" (a ResNet: the same keys).
    description: the network in words, e.g. "ResNet with basic blocks (2, 2, 2, 2), ...".
    config: the ``config.model`` fields that build it in jaxembed (name first), or None.
    unsupported: why jaxembed cannot build it, or None.
  """
  layout: str
  description: str
  config: Optional[Dict[str, Any]] = None
  unsupported: Optional[str] = None

  def hint(self) -> str:
    """One sentence for an error message."""
    text = f"the file holds {self.description} in {self.layout} layout"
    if self.unsupported:
      return f"{text}, which jaxembed does not build: {self.unsupported}"
    if self.config:
      fields = ", ".join(f"model.{k}={v!r}" for k, v in self.config.items())
      return f"{text}; jaxembed builds it with {fields}"
    return text


def _conv_shapes(shapes: Mapping[str, Tuple[int, ...]], pattern: str):
  """{match groups (as ints): shape} of the 4-D weights whose key fully matches ``pattern``."""
  out = {}
  for key, shape in shapes.items():
    m = re.fullmatch(pattern, key)
    if m and len(shape) == 4:
      out[tuple(int(g) for g in m.groups())] = tuple(shape)
  return out


def _recognise_resnet(shapes) -> Recognised:
  layout = RESNET_LAYOUT
  if "conv1.0.weight" in shapes:
    return Recognised(layout, "ResNet with a deep stem (conv1.0, conv1.1, ...)",
                      unsupported="a deep 3-convolution stem (timm's resnet*d, resnet*s); "
                      "jaxembed's ResNet stem is a single convolution")
  if any(".se." in k for k in shapes):
    return Recognised(layout, "SE-ResNet", unsupported="squeeze-excitation in the ResNet blocks")
  if any(re.fullmatch(r"layer\d+\.\d+\.downsample\.2\.weight", k) for k in shapes):
    return Recognised(layout, "ResNet with average-pool shortcuts (downsample.1 is a conv)",
                      unsupported="an average-pool shortcut (timm's resnet*d); jaxembed's "
                      "strided shortcut is a 1x1 convolution")
  convs = _conv_shapes(shapes, r"layer(\d+)\.(\d+)\.conv1\.weight")
  stem = shapes.get("conv1.weight")
  if not convs or stem is None or len(stem) != 4:
    return Recognised(layout, "ResNet missing its stem or blocks")
  bottleneck = any(re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", k) for k in shapes)
  stages = sorted({s for s, _ in convs})
  stage_sizes = tuple(1 + max(b for s2, b in convs if s2 == s) for s in stages)
  widths = tuple(convs[(s, 0)][0] for s in stages if (s, 0) in convs)
  stem_name = {7: "imagenet", 3: "cifar"}.get(stem[2])
  kind = "bottleneck" if bottleneck else "basic"
  description = (f"ResNet with {kind} blocks {stage_sizes}, widths {widths} and a "
                 f"{stem[2]}x{stem[3]} stem")
  if stem_name is None:
    return Recognised(layout, description, unsupported=f"a {stem[2]}x{stem[3]} stem convolution "
                      "(jaxembed's are 7x7, stem='imagenet', and 3x3, stem='cifar')")
  if stem[0] != widths[0]:
    return Recognised(layout, description, unsupported=f"a stem of {stem[0]} channels before a "
                      f"first stage of {widths[0]}")
  block = resnet.BottleneckBlock if bottleneck else resnet.BasicBlock
  candidates = [n for n in ("resnet18", "resnet34", "resnet50", "resnet_tiny")
                if registry.create_backbone(n).block is block]
  for name in candidates:
    net = registry.create_backbone(name)
    if (tuple(net.stage_sizes), tuple(net.widths)) == (stage_sizes, widths):
      return Recognised(layout, f"{name} ({description})", {"name": name, "stem": stem_name})
  return Recognised(layout, description, {"name": candidates[0], "stem": stem_name,
                                          "stage_sizes": stage_sizes, "widths": widths,
                                          "width_multiplier": 1.0})


def _efficientnet_blocks(shapes, layout):
  """(stem channels, head channels, has SE, {(stage, block): [conv shapes in block order]})."""
  if layout == TIMM:
    block_key, se_part = r"blocks\.(\d+)\.(\d+)\.", ".se."
    stem, head = shapes.get("conv_stem.weight"), shapes.get("conv_head.weight")
    first_stage = 0
  else:
    block_key, se_part = r"features\.(\d+)\.(\d+)\.block\.", (".fc1.", ".fc2.")
    stem = shapes.get("features.0.0.weight")
    ends = _conv_shapes(shapes, r"features\.(\d+)\.0\.weight")
    head = ends[max(ends)] if ends and max(ends)[0] > 0 else None
    first_stage = 1
  blocks, has_se = {}, False
  for key in sorted(shapes):
    m = re.match(block_key, key)
    if not m or len(shapes[key]) != 4:
      continue
    if any(p in key for p in ((se_part,) if isinstance(se_part, str) else se_part)):
      has_se = True
      continue
    index = (int(m.group(1)) - first_stage, int(m.group(2)))
    blocks.setdefault(index, []).append(tuple(shapes[key]))
  return stem, head, has_se, blocks


def _block_spec(convs):
  """(kernel, expand ratio, input channels, output channels) of one MBConv from its convs."""
  depthwise = [s for s in convs if s[1] == 1 and s[2] > 1]
  if len(depthwise) != 1:
    return None
  mid, kernel = depthwise[0][0], depthwise[0][2]
  project = [s for s in convs if s[1] == mid and s[2] == 1]
  expand = [s for s in convs if s[0] == mid and s[1] != 1 and s[2] == 1]
  if len(project) != 1 or len(expand) > 1:
    return None
  in_channels = expand[0][1] if expand else mid
  return kernel, mid // in_channels if expand else 1, in_channels, project[0][0]


def _recognise_efficientnet(shapes, layout) -> Recognised:
  stem, head, has_se, blocks = _efficientnet_blocks(shapes, layout)
  specs = {index: _block_spec(convs) for index, convs in blocks.items()}
  if stem is None or head is None or not specs or None in specs.values():
    return Recognised(layout, "EfficientNet-like network whose blocks jaxembed cannot read")
  stage_ids = sorted({s for s, _ in specs})
  stage_sizes = tuple(1 + max(b for s2, b in specs if s2 == s) for s in stage_ids)
  widths = tuple(specs[(s, 0)][3] for s in stage_ids)
  table = tuple((specs[(s, 0)][1], specs[(s, 0)][0]) for s in stage_ids)  # (expand, kernel)
  description = (f"EfficientNet with stem {stem[0]}, stage blocks {stage_sizes}, widths "
                 f"{widths} and head {head[0]}")
  b0_table = tuple((s.expand_ratio, s.kernel_size) for s in efficientnet.B0_STAGES)
  if not has_se:
    return Recognised(layout, description, unsupported="no squeeze-excitation (an "
                      "EfficientNet-Lite or MobileNet?); jaxembed's MBConv blocks have it")
  if table != b0_table:
    return Recognised(layout, description, unsupported=f"stages with (expansion, kernel) {table}"
                      f"; jaxembed's EfficientNets have {b0_table}")
  presets = [f"efficientnet_b{i}" for i in range(4)]
  for name in presets:
    net = registry.create_backbone(name)
    if (net.stem_channels, net.head_channels, tuple(s.num_blocks for s in net.stages),
        tuple(s.out_channels for s in net.stages)) == (stem[0], head[0], stage_sizes, widths):
      return Recognised(layout, f"{name} ({description})", {"name": name})
  same_stem = [n for n in presets if registry.create_backbone(n).stem_channels == stem[0]]
  if not same_stem or head[0] != 4 * widths[-1]:
    return Recognised(layout, description, unsupported="its stem and head widths match no "
                      "EfficientNet-B0..B3 with per-stage overrides (head = 4 x last width)")
  return Recognised(layout, description, {"name": same_stem[0], "stage_sizes": stage_sizes,
                                          "widths": widths, "width_multiplier": 1.0})


def recognise(shapes: Mapping[str, Sequence[int]]) -> Optional[Recognised]:
  """Which network a cleaned state dict {key: shape} holds, if it is a ResNet or EfficientNet."""
  shapes = {k: tuple(v) for k, v in shapes.items()}
  layout = detect_layout(shapes)
  if layout == TIMM or any(k.startswith("features.") for k in shapes):
    return _recognise_efficientnet(shapes, layout)
  if layout == TORCHVISION:
    return _recognise_resnet(shapes)
  return None
