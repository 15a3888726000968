"""Backbones (ResNet, EfficientNet), the projector head, and torchvision weight import."""

from jaxembed.models.heads import Projector
from jaxembed.models.heads import TSimCNEModel
from jaxembed.models.registry import BACKBONES
from jaxembed.models.registry import NATURAL_IMAGE_SIZE
from jaxembed.models.registry import backbone_kwargs
from jaxembed.models.registry import create_backbone
from jaxembed.models.registry import create_model

__all__ = [
    "BACKBONES", "NATURAL_IMAGE_SIZE", "Projector", "TSimCNEModel", "backbone_kwargs",
    "create_backbone", "create_model",
]
