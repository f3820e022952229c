"""Build and load networks: the spec type, the model card, the SelecSLS module, baselines, weights, files."""

from selecsls.models.build import resolve_spec
from selecsls.models.card import ModelCard, Preprocessing, Provenance
from selecsls.models.complexity import count_flops, count_macs, count_params
from selecsls.models.factory import create_model, list_models
from selecsls.models.files import save
from selecsls.models.fusion import fuse
from selecsls.models.loading import load
from selecsls.models.network import SelecSLS, SelecSLSFeatures
from selecsls.models.spec import BlockSpec, HeadConvSpec, ModelSpec, SpecError, get_spec

__all__ = [
    "BlockSpec",
    "HeadConvSpec",
    "ModelCard",
    "ModelSpec",
    "Preprocessing",
    "Provenance",
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
