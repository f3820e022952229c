"""SelecSLS Net: fast, prunable CNN backbones from XNect, as data-driven PyTorch models.

The public API is re-exported here and imported on first use (PEP 562), so ``import
selecsls`` and the ``selecsls`` command's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the sub-package that defines it.
_EXPORTS = {
    # Files appear whole or not at all (scripts built on the package write their outputs the same way).
    **{name: "selecsls._io" for name in ("OutputError", "atomic_write", "check_output")},
    "MissingDependency": "selecsls._optional",
    "analyze_sparsity": "selecsls.compress",
    "freeze": "selecsls.deploy.freeze",
    "prune": "selecsls.compress",
    "prune_to_budget": "selecsls.compress",
    **{
        name: "selecsls.models"
        for name in (
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
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'selecsls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
