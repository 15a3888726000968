"""ResNet backbones (18/34/50 and small variants) laid out like torchvision's, in Flax Linen.

Module names follow torchvision's (``conv1``, ``bn1``, ``layer1_0``, ``downsample_conv``, ...)
so that :mod:`jaxembed.models.torch_import` can map a torchvision ``state_dict`` onto them.
The output is the globally average-pooled feature vector (the classifier ``fc`` is left out).

Conventions kept for torchvision parity (He et al. 2016; torchvision ``resnet.py``):
- PyTorch's symmetric padding ``(k - 1) // 2`` for every convolution (not 'SAME');
- BatchNorm eps 1e-5, momentum 0.1 in PyTorch terms (0.9 in Flax's);
- ResNet-50 puts the stride on the 3x3 convolution of the bottleneck ("v1.5");
- convolutions are initialised kaiming-normal with fan_out, BatchNorm scale 1 and bias 0.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from jaxembed import parallel
from jaxembed.models import cpu_conv

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch BatchNorm2d defaults: eps 1e-5 and momentum 0.1 (running = 0.9 running + 0.1 batch),
# which is Flax's momentum 0.9. torchvision's ResNets and EfficientNet-B0..B4 keep them.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

STEMS = ("cifar", "imagenet")


def resolve_dtype(dtype: Any) -> Any:
  """Maps "float32" / "bfloat16" (or a dtype) to a jnp dtype; a clear error otherwise."""
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    known = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if dtype not in known:
      raise ValueError(f"unknown compute dtype {dtype!r}; use one of {sorted(known)}")
    return known[dtype]
  return jnp.dtype(dtype).type


def torch_conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1,
               use_bias: bool = False, dtype: Any = jnp.float32, name: str | None = None,
               platform: str | None = None):
  """A Flax Conv padded as PyTorch pads: ``(k - 1) // 2`` on both sides.

  'SAME' pads asymmetrically (more on the bottom/right) for a strided convolution on an even
  input, which would shift every feature map by a pixel relative to imported PyTorch weights.
  ``platform`` is the platform the model is compiled for (None: that of ``jax.devices()``,
  jaxembed.parallel.platform); CPUs get the convolution workaround of ``cpu_conv``.
  """
  pad = (kernel_size - 1) // 2
  conv = (cpu_conv.conv_general_dilated if parallel.uses_cpu_paths(platform)
          else lax.conv_general_dilated)
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=[(pad, pad), (pad, pad)], feature_group_count=groups,
                 use_bias=use_bias, kernel_init=conv_init, dtype=dtype,
                 param_dtype=jnp.float32, name=name, conv_general_dilated=conv)


def batch_norm(train: bool, dtype: Any = jnp.float32, epsilon: float = BN_EPSILON,
               name: str | None = None):
  """BatchNorm with PyTorch's defaults; statistics go to the ``batch_stats`` collection."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=epsilon,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def scale_width(width: int, multiplier: float) -> int:
  """Channels of a stage after the width multiplier (at least 1)."""
  return max(1, int(round(width * multiplier)))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""
  width: int
  strides: int = 1
  dtype: Any = jnp.float32
  platform: str | None = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(torch_conv, dtype=self.dtype, platform=self.platform)
    out_features = self.width * self.expansion
    y = conv(self.width, 3, self.strides, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = conv(out_features, 3, name="conv2")(y)
    y = batch_norm(train, self.dtype, name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = conv(out_features, 1, self.strides, name="downsample_conv")(x)
      x = batch_norm(train, self.dtype, name="downsample_bn")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided, as torchvision's v1.5), 1x1 expand by 4; ResNet-50."""
  width: int
  strides: int = 1
  dtype: Any = jnp.float32
  platform: str | None = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(torch_conv, dtype=self.dtype, platform=self.platform)
    out_features = self.width * self.expansion
    y = conv(self.width, 1, name="conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
    y = conv(self.width, 3, self.strides, name="conv2")(y)
    y = nn.relu(batch_norm(train, self.dtype, name="bn2")(y))
    y = conv(out_features, 1, name="conv3")(y)
    y = batch_norm(train, self.dtype, name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = conv(out_features, 1, self.strides, name="downsample_conv")(x)
      x = batch_norm(train, self.dtype, name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A ResNet feature extractor: stem, stages of residual blocks, global average pooling.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18. Any number of stages.
    widths: channels per stage before the block expansion, e.g. (64, 128, 256, 512).
    block: BasicBlock or BottleneckBlock.
    stem: "cifar" (3x3 conv stride 1, no max-pool; the t-SimCNE reference for images up to
      ~64 px) or "imagenet" (7x7 conv stride 2 and a 3x3 stride-2 max-pool).
    width_multiplier: scales every width (stem included), for small variants.
    dtype: compute dtype; parameters are float32 and the features are returned as float32.
    platform: the platform it is compiled for ("cpu" | "gpu" | "tpu"; None: that of
      ``jax.devices()``), which picks the convolution implementation (``torch_conv``).
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block: Callable[..., nn.Module] = BasicBlock
  stem: str = "cifar"
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32
  platform: str | None = None

  @property
  def num_features(self) -> int:
    return scale_width(self.widths[-1], self.width_multiplier) * self.block.expansion

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images, got an array of shape {x.shape}")
    x = jnp.asarray(x, self.dtype)
    conv = functools.partial(torch_conv, dtype=self.dtype, platform=self.platform)
    widths = [scale_width(w, self.width_multiplier) for w in self.widths]
    if self.stem == "cifar":
      x = conv(widths[0], 3, 1, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
    elif self.stem == "imagenet":
      x = conv(widths[0], 7, 2, name="conv1")(x)
      x = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
      # torch.nn.MaxPool2d(3, 2, padding=1) pads with -inf, as Flax's max_pool does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; use one of {STEMS}")
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, widths)):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(width=width, strides=strides, dtype=self.dtype, platform=self.platform,
                       name=f"layer{i + 1}_{j}")(x, train)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _check_stages(stage_sizes, widths):
  stage_sizes, widths = tuple(int(s) for s in stage_sizes), tuple(int(w) for w in widths)
  if len(stage_sizes) != len(widths) or not stage_sizes:
    raise ValueError(
        f"stage_sizes {stage_sizes} and widths {widths} must be non-empty and of equal length "
        "(one entry per stage); set both model.stage_sizes and model.widths")
  if min(stage_sizes) < 1 or min(widths) < 1:
    raise ValueError(f"stage_sizes {stage_sizes} and widths {widths} must be positive")
  return stage_sizes, widths


def _resnet(default_stage_sizes, default_widths, block, default_stem, *, stem=None,
            width_multiplier=1.0, stage_sizes=None, widths=None, dtype="float32",
            platform=None):
  stage_sizes = default_stage_sizes if stage_sizes is None else stage_sizes
  widths = default_widths if widths is None else widths
  # An override of one tuple alone must keep the number of stages of the other.
  if len(tuple(stage_sizes)) != len(tuple(widths)):
    raise ValueError(
        f"stage_sizes {tuple(stage_sizes)} and widths {tuple(widths)} have different numbers "
        "of stages; give both (model.stage_sizes and model.widths) with one entry per stage")
  stage_sizes, widths = _check_stages(stage_sizes, widths)
  stem = default_stem if stem is None else stem
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r}; use one of {STEMS}")
  if not width_multiplier or width_multiplier <= 0:
    raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
  return ResNet(stage_sizes=stage_sizes, widths=widths, block=block, stem=stem,
                width_multiplier=float(width_multiplier), dtype=resolve_dtype(dtype),
                platform=platform)


# The default stem of the full-size nets is torchvision's ("imagenet"), so that their
# parameter counts and imported weights match it; the t-SimCNE configs ask for "cifar".
resnet18 = functools.partial(_resnet, (2, 2, 2, 2), (64, 128, 256, 512), BasicBlock, "imagenet")
resnet34 = functools.partial(_resnet, (3, 4, 6, 3), (64, 128, 256, 512), BasicBlock, "imagenet")
resnet50 = functools.partial(_resnet, (3, 4, 6, 3), (64, 128, 256, 512), BottleneckBlock,
                             "imagenet")
# Small ResNet for tests and the CPU default (digits): basic blocks, CIFAR stem.
resnet_tiny = functools.partial(_resnet, (1, 1, 1), (16, 32, 64), BasicBlock, "cifar")
