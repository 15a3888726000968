"""Backbones by name, and the one function that builds the t-SimCNE model from a config."""

from typing import Any, Callable, Dict

from jaxembed.models import efficientnet
from jaxembed.models import heads
from jaxembed.models import resnet

# name -> constructor(**kw) returning a module whose __call__(x, train) gives (B, D) float32.
BACKBONES: Dict[str, Callable[..., Any]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet_tiny": resnet.resnet_tiny,
    "efficientnet_b0": efficientnet.efficientnet_b0,
    "efficientnet_b1": efficientnet.efficientnet_b1,
    "efficientnet_b2": efficientnet.efficientnet_b2,
    "efficientnet_b3": efficientnet.efficientnet_b3,
}

# Input size each backbone was designed for (benchmarks; the models accept any size).
NATURAL_IMAGE_SIZE: Dict[str, int] = {
    "resnet18": 224, "resnet34": 224, "resnet50": 224, "resnet_tiny": 32,
    **{name: scaling[2] for name, scaling in efficientnet.COMPOUND_SCALING.items()},
}


# The family of each backbone. model.stage_sizes and model.widths mean different things in
# each (a ResNet's residual stages, any number of them; an EfficientNet's 7 MBConv stages), so
# values written for one family do not carry over to the other (configlib.resolve_backbone).
# model.stem ("cifar" | "imagenet") and model.width_multiplier mean the same in both.
FAMILIES: Dict[str, str] = {
    **{name: "resnet" for name in ("resnet18", "resnet34", "resnet50", "resnet_tiny")},
    **{name: "efficientnet" for name in efficientnet.COMPOUND_SCALING},
}
FAMILY_OPTIONS = ("stage_sizes", "widths")
# Stages a family's stage_sizes and widths must have (None: any number).
FAMILY_STAGE_COUNT: Dict[str, Any] = {"resnet": None, "efficientnet": len(efficientnet.B0_STAGES)}
# Backbones whose stage_sizes and widths are meant to be set (the others are published nets).
CONFIGURABLE = ("resnet_tiny",)


def own_options(name: str) -> Dict[str, tuple]:
  """``{"stage_sizes", "widths"}`` of backbone ``name`` as published (without overrides)."""
  module = create_backbone(name)
  if isinstance(module, resnet.ResNet):
    return {"stage_sizes": tuple(module.stage_sizes), "widths": tuple(module.widths)}
  return {"stage_sizes": tuple(s.num_blocks for s in module.stages),
          "widths": tuple(s.out_channels for s in module.stages)}


def option_fits(name: str, option: str, value) -> bool:
  """Whether ``value`` of ``model.<option>`` (one of FAMILY_OPTIONS) can shape backbone ``name``."""
  count = FAMILY_STAGE_COUNT[FAMILIES[name]]
  return count is None or len(tuple(value)) == count


def create_backbone(name: str, **kw) -> Any:
  """Builds the backbone ``name`` (a key of ``BACKBONES``).

  Args:
    name: e.g. "resnet18", "resnet50", "efficientnet_b3", "resnet_tiny".
    **kw: options of that family: ``stem`` ("cifar" | "imagenet"), ``width_multiplier``,
      ``stage_sizes``, ``widths``, ``dtype`` ("float32" | "bfloat16"), ``platform`` (see
      ``create_model``); keys whose value is None are ignored (the preset's value is kept).

  Returns:
    An unbound Flax module; ``module.apply(variables, x, train=...)`` maps NHWC float images to
    (B, D) float32 features.
  """
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
  kw = {k: v for k, v in kw.items() if v is not None}
  try:
    return BACKBONES[name](**kw)
  except TypeError as e:
    raise TypeError(f"bad option for backbone {name!r}: {e}") from e


def backbone_kwargs(model_config) -> Dict[str, Any]:
  """The backbone options of ``config.model`` (fields left at None keep the preset's value)."""
  get = lambda field: getattr(model_config, field, None)  # noqa: E731
  kw = {"stem": get("stem"), "width_multiplier": get("width_multiplier"),
        "stage_sizes": get("stage_sizes"), "widths": get("widths"), "dtype": get("dtype")}
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if v is not None}


def create_model(model_config, head_dim: int = 128,
                 platform: str | None = None) -> heads.TSimCNEModel:
  """Backbone + projector described by ``config.model`` (see configs/common.py).

  Args:
    model_config: ``config.model`` (fields name, stem, width_multiplier, stage_sizes, widths,
      hidden_dim, dtype, input_mean, input_std).
    head_dim: output dimension of the projector (128 in stage 1, 2 afterwards).
    platform: the platform the model is compiled for ("cpu" | "gpu" | "tpu"), which picks
      platform-specific implementations (the CPU convolution workaround); None: that of
      ``jax.devices()``. Pass ``jaxembed.parallel.platform(mesh)``.

  Returns:
    A ``TSimCNEModel``; ``apply(variables, x, train)`` returns
    ``{"features", "hidden", "z"}``, all float32.
  """
  name = getattr(model_config, "name", None)
  if name is None:
    raise ValueError("config.model.name is not set; use one of " + str(sorted(BACKBONES)))
  backbone = create_backbone(name, platform=platform, **backbone_kwargs(model_config))
  hidden_dim = int(getattr(model_config, "hidden_dim", None) or 1024)
  mean, std = getattr(model_config, "input_mean", None), getattr(model_config, "input_std", None)
  return heads.TSimCNEModel(
      backbone=backbone, hidden_dim=hidden_dim, head_dim=int(head_dim),
      input_mean=None if mean is None else tuple(float(m) for m in mean),
      input_std=None if std is None else tuple(float(s) for s in std))
