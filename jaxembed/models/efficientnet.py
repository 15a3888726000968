"""EfficientNet-B0..B3 backbones laid out like torchvision's, in Flax Linen.

EfficientNet (Tan & Le, ICML 2019): an MBConv network (inverted residuals with depthwise
convolutions, squeeze-excitation and swish) scaled by compound coefficients. The stage table,
the scaling rules (channels rounded to multiples of 8, depth rounded up) and the drop rates
follow torchvision's ``efficientnet.py``, so a torchvision ``state_dict`` imports unchanged
(:mod:`jaxembed.models.torch_import`) and the parameter counts agree (B0 4,007,548; B3
10,696,232 without the classifier). Output: globally average-pooled features (1280 for B0/B1,
1408 for B2, 1536 for B3), after the classifier's dropout when training (as timm's
``forward_head(pre_logits=True)`` does); the final Linear is left out.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxembed.models import resnet

STEMS = ("imagenet", "cifar")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One row of the EfficientNet-B0 table (Tan & Le 2019, table 1)."""
  expand_ratio: int
  kernel_size: int
  strides: int
  out_channels: int
  num_blocks: int


# EfficientNet-B0 (torchvision's ``_efficientnet_conf``): stem 32 channels, then 7 stages.
B0_STEM_CHANNELS = 32
B0_STAGES = (
    StageConfig(1, 3, 1, 16, 1),
    StageConfig(6, 3, 2, 24, 2),
    StageConfig(6, 5, 2, 40, 2),
    StageConfig(6, 3, 2, 80, 3),
    StageConfig(6, 5, 1, 112, 3),
    StageConfig(6, 5, 2, 192, 4),
    StageConfig(6, 3, 1, 320, 1),
)

# (width coefficient, depth coefficient, resolution, classifier dropout), as published and in
# torchvision. Stochastic depth rises linearly over the blocks to 0.2 for every variant.
COMPOUND_SCALING = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
}
STOCHASTIC_DEPTH_PROB = 0.2


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds channels to a multiple of ``divisor``, never more than 10% down (torchvision)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class ConvBN(nn.Module):
  """Conv (no bias, PyTorch padding) -> BatchNorm -> optional swish; torchvision's
  ``Conv2dNormActivation`` (sub-modules ``conv`` and ``bn`` are its ``0`` and ``1``)."""
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  activate: bool = True
  dtype: Any = jnp.float32
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = resnet.torch_conv(self.features, self.kernel_size, self.strides, self.groups,
                          dtype=self.dtype, platform=self.platform, name="conv")(x)
    x = resnet.batch_norm(train, self.dtype, name="bn")(x)
    return nn.swish(x) if self.activate else x


class SqueezeExcitation(nn.Module):
  """Channel gating: mean-pool, 1x1 conv down + swish, 1x1 conv up + sigmoid, scale."""
  squeeze_channels: int
  dtype: Any = jnp.float32
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = resnet.torch_conv(self.squeeze_channels, 1, use_bias=True, dtype=self.dtype,
                          platform=self.platform, name="reduce")(s)
    s = resnet.torch_conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype,
                          platform=self.platform, name="expand")(nn.swish(s))
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project.

  The residual branch is dropped per example with probability ``drop_prob`` in training
  (stochastic depth, torchvision's "row" mode) and only where input and output shapes agree.
  """
  out_channels: int
  expand_ratio: int
  kernel_size: int
  strides: int
  drop_prob: float
  dtype: Any = jnp.float32
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv_bn = functools.partial(ConvBN, dtype=self.dtype, platform=self.platform)
    in_channels = x.shape[-1]
    expanded = make_divisible(in_channels * self.expand_ratio)
    y = x
    if expanded != in_channels:
      y = conv_bn(expanded, 1, name="expand")(y, train)
    y = conv_bn(expanded, self.kernel_size, self.strides, groups=expanded,
                name="depthwise")(y, train)
    # torchvision squeezes to a quarter of the block's *input* channels.
    y = SqueezeExcitation(max(1, in_channels // 4), dtype=self.dtype, platform=self.platform,
                          name="se")(y)
    y = conv_bn(self.out_channels, 1, activate=False, name="project")(y, train)
    if self.strides == 1 and in_channels == self.out_channels:
      if train and self.drop_prob > 0:
        keep = 1.0 - self.drop_prob
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
        y = jnp.where(mask, y / keep, jnp.zeros_like(y))
      y = y + x
    return y


class EfficientNet(nn.Module):
  """An EfficientNet feature extractor.

  Attributes:
    stages: the stage table after compound scaling (channels and block counts).
    stem_channels: channels of the stem convolution.
    head_channels: channels of the final 1x1 convolution (= feature dimension).
    stem: "imagenet" (3x3 conv stride 2, the published net) or "cifar" (stride 1, for small
      images: the other four stride-2 stages still reduce the size 16-fold).
    dropout_rate: dropout on the pooled features in training (the classifier's dropout).
    stochastic_depth_prob: drop probability of the last block; block i of n gets
      ``stochastic_depth_prob * i / n``.
    dtype: compute dtype; parameters are float32 and the features are returned as float32.
    platform: the platform it is compiled for (None: that of ``jax.devices()``); see
      ``resnet.torch_conv``.
  """
  stages: Sequence[StageConfig]
  stem_channels: int
  head_channels: int
  stem: str = "imagenet"
  dropout_rate: float = 0.2
  stochastic_depth_prob: float = STOCHASTIC_DEPTH_PROB
  dtype: Any = jnp.float32
  platform: Optional[str] = None

  @property
  def num_features(self) -> int:
    return self.head_channels

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"EfficientNet expects NHWC images, got an array of shape {x.shape}")
    if self.stem not in STEMS:
      raise ValueError(f"unknown stem {self.stem!r}; use one of {STEMS}")
    if train and (self.dropout_rate > 0 or self.stochastic_depth_prob > 0) and not self.has_rng(
        "dropout"):
      raise ValueError(
          "EfficientNet in training mode needs a 'dropout' random key for stochastic depth and "
          "dropout: call apply(..., rngs={'dropout': key}), or build it with dropout_rate=0 and "
          "stochastic_depth_prob=0")
    x = jnp.asarray(x, self.dtype)
    x = ConvBN(self.stem_channels, 3, 2 if self.stem == "imagenet" else 1, dtype=self.dtype,
               platform=self.platform, name="stem")(x, train)
    total_blocks = sum(s.num_blocks for s in self.stages)
    block_id = 0
    for i, stage in enumerate(self.stages):
      for j in range(stage.num_blocks):
        x = MBConv(stage.out_channels, stage.expand_ratio, stage.kernel_size,
                   stage.strides if j == 0 else 1,
                   drop_prob=self.stochastic_depth_prob * block_id / total_blocks,
                   dtype=self.dtype, platform=self.platform, name=f"stage{i + 1}_{j}")(x, train)
        block_id += 1
    x = ConvBN(self.head_channels, 1, dtype=self.dtype, platform=self.platform,
               name="head")(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.dropout_rate > 0:
      features = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    return features


def _efficientnet(variant: str, *, stem: str = "imagenet", width_multiplier: float = 1.0,
                  stage_sizes: Optional[Sequence[int]] = None,
                  widths: Optional[Sequence[int]] = None, dtype: Any = "float32",
                  dropout_rate: Optional[float] = None,
                  stochastic_depth_prob: float = STOCHASTIC_DEPTH_PROB,
                  platform: Optional[str] = None) -> EfficientNet:
  """EfficientNet ``variant`` with its compound scaling.

  Args:
    variant: a key of ``COMPOUND_SCALING``.
    stem: "imagenet" (published) or "cifar" (stride-1 stem for small images).
    width_multiplier: extra width factor on top of the compound one (small test variants).
    stage_sizes: blocks of each of the 7 stages, replacing the depth scaling.
    widths: output channels of each of the 7 stages, replacing the width scaling (times
      ``width_multiplier``); the head then has 4 x the last of them.
    dtype: compute dtype ("float32" | "bfloat16").
    dropout_rate: feature dropout in training; None takes the published rate.
    stochastic_depth_prob: see ``EfficientNet``.
    platform: see ``EfficientNet``.
  """
  width_coef, depth_coef, _, published_dropout = COMPOUND_SCALING[variant]
  if stem not in STEMS:
    raise ValueError(f"unknown stem {stem!r} for {variant}; use one of {STEMS}")
  if not width_multiplier or width_multiplier <= 0:
    raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
  n = len(B0_STAGES)
  for field, value in (("stage_sizes", stage_sizes), ("widths", widths)):
    if value is not None and (len(tuple(value)) != n or min(value) < 1):
      raise ValueError(f"{variant}: {field} {tuple(value)} must give {n} positive numbers, one "
                       "per MBConv stage (or None for the published scaling)")
  scale = width_coef * width_multiplier
  stages = []
  for i, s in enumerate(B0_STAGES):
    out = (make_divisible(widths[i] * width_multiplier) if widths is not None
           else make_divisible(s.out_channels * scale))
    blocks = (int(stage_sizes[i]) if stage_sizes is not None
              else int(math.ceil(s.num_blocks * depth_coef)))
    stages.append(dataclasses.replace(s, out_channels=out, num_blocks=blocks))
  return EfficientNet(
      stages=tuple(stages), stem_channels=make_divisible(B0_STEM_CHANNELS * scale),
      head_channels=4 * stages[-1].out_channels, stem=stem,
      dropout_rate=published_dropout if dropout_rate is None else float(dropout_rate),
      stochastic_depth_prob=float(stochastic_depth_prob), dtype=resnet.resolve_dtype(dtype),
      platform=platform)


efficientnet_b0 = functools.partial(_efficientnet, "efficientnet_b0")
efficientnet_b1 = functools.partial(_efficientnet, "efficientnet_b1")
efficientnet_b2 = functools.partial(_efficientnet, "efficientnet_b2")
efficientnet_b3 = functools.partial(_efficientnet, "efficientnet_b3")
