"""Build and load networks: the spec type, the SelecSLS module, baselines, weights, checkpoints, save/load."""

from selecsls.models.complexity import count_flops, count_macs, count_params
from selecsls.models.factory import create_model, list_models, resolve_spec
from selecsls.models.fusion import fuse
from selecsls.models.network import SelecSLS, SelecSLSFeatures
from selecsls.models.serialization import load, save
from selecsls.models.spec import BlockSpec, HeadConvSpec, ModelSpec, SpecError, get_spec

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
    "load",
    "resolve_spec",
    "save",
]
