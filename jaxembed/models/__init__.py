"""Backbones (ResNet, EfficientNet), the projector head, and PyTorch weight import."""

from jaxembed.models.heads import Projector
from jaxembed.models.heads import TSimCNEModel
from jaxembed.models.registry import BACKBONES
from jaxembed.models.registry import CONFIGURABLE
from jaxembed.models.registry import FAMILIES
from jaxembed.models.registry import FAMILY_OPTIONS
from jaxembed.models.registry import NATURAL_IMAGE_SIZE
from jaxembed.models.registry import backbone_kwargs
from jaxembed.models.registry import create_backbone
from jaxembed.models.registry import create_model
from jaxembed.models.registry import option_fits
from jaxembed.models.registry import own_options
from jaxembed.models.torch_import import ImportReport
from jaxembed.models.torch_import import TorchRequiredError
from jaxembed.models.torch_import import convert_command
from jaxembed.models.torch_import import convert_state_dict
from jaxembed.models.torch_import import load_pretrained
from jaxembed.models.torch_import import load_torch_state_dict
from jaxembed.models.torch_import import read_state_dict

__all__ = [
    "BACKBONES", "CONFIGURABLE", "FAMILIES", "FAMILY_OPTIONS", "ImportReport",
    "NATURAL_IMAGE_SIZE", "Projector", "TSimCNEModel", "TorchRequiredError", "backbone_kwargs",
    "convert_command", "convert_state_dict", "create_backbone", "create_model",
    "load_pretrained", "load_torch_state_dict", "option_fits", "own_options",
    "read_state_dict",
]
