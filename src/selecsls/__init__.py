"""SelecSLS Net: fast, prunable CNN backbones from XNect, as data-driven PyTorch models."""

from .complexity import count_flops, count_macs, count_params
from .fusion import fuse
from .factory import create_model, list_models, resolve_spec
from .model import SelecSLS, SelecSLSFeatures
from .spec import BlockSpec, HeadConvSpec, ModelSpec, SpecError, get_spec

__version__ = "0.1.0"

__all__ = [
    "BlockSpec",
    "HeadConvSpec",
    "ModelSpec",
    "SelecSLS",
    "SelecSLSFeatures",
    "SpecError",
    "count_flops",
    "count_macs",
    "count_params",
    "create_model",
    "fuse",
    "get_spec",
    "list_models",
    "resolve_spec",
]
