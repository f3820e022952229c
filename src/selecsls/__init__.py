"""SelecSLS Net: fast, prunable CNN backbones from XNect, as data-driven PyTorch models."""

from .complexity import count_flops, count_macs, count_params
from .fusion import fuse
from .factory import create_model, list_models, resolve_spec
from .model import SelecSLS, SelecSLSFeatures
from .pruning import prune, prune_to_budget
from .serialization import load, save
from .sparsity import analyze_sparsity
from .spec import BlockSpec, HeadConvSpec, ModelSpec, SpecError, get_spec

__version__ = "0.1.0"

__all__ = [
    "BlockSpec",
    "HeadConvSpec",
    "ModelSpec",
    "SelecSLS",
    "SelecSLSFeatures",
    "SpecError",
    "analyze_sparsity",
    "count_flops",
    "count_macs",
    "count_params",
    "create_model",
    "fuse",
    "get_spec",
    "list_models",
    "load",
    "prune",
    "prune_to_budget",
    "resolve_spec",
    "save",
]
