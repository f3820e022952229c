"""``save`` / ``load``: a model stored as data (spec, build arguments, preprocessing, weights).

The file rebuilds the model on its own: no pickled classes, so it loads with
``weights_only=True`` and survives refactors. The description is JSON text under one key
(``"selecsls"``) next to the ``"state_dict"`` tensors; a ``.safetensors`` path keeps the
same JSON in the file's metadata. Training checkpoints embed the same payload
(``{**to_payload(model), "optimizer": ...}``), so :func:`load` reads them too.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import nn

from ._io import atomic_path, atomic_write
from .checkpoint import CheckpointError, load_checkpoint, read_file
from .factory import create_model
from .fusion import fuse
from .model import SelecSLS, SelecSLSFeatures
from .spec import ModelSpec

__all__ = ["FORMAT", "PAYLOAD_KEY", "from_payload", "is_payload", "load", "save", "to_payload"]

#: Key of the JSON description in a payload (and in safetensors metadata).
PAYLOAD_KEY = "selecsls"
FORMAT = "selecsls.model"
FORMAT_VERSION = 1
#: Keyword arguments of ``load`` / ``from_payload`` that change how the model is rebuilt.
OVERRIDES = ("num_classes", "drop_rate", "global_pool", "output_stride", "fused", "features_only", "out_indices")


def to_payload(model: nn.Module) -> dict[str, Any]:
    """``{"selecsls": JSON description, "state_dict": CPU tensors}`` for ``model`` (any SelecSLS)."""
    if not isinstance(model, SelecSLS):
        raise TypeError(f"selecsls.save stores SelecSLS models, got {type(model).__name__}")
    description = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "features_only": isinstance(model, SelecSLSFeatures),
        "build_args": model.build_args,
        "pretrained_cfg": model.pretrained_cfg,
    }
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    return {PAYLOAD_KEY: json.dumps(description, sort_keys=True), "state_dict": state}


def is_payload(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get(PAYLOAD_KEY), str)


def from_payload(payload: Mapping[str, Any], **overrides: Any) -> SelecSLS:
    """Rebuild the model a payload describes; ``overrides`` change build arguments.

    ``num_classes`` re-initialises the classifier (with a warning); ``features_only=True``
    drops it; ``fused=True`` folds BatchNorm after loading. Unfusing is impossible. Like
    ``create_model``, the model comes back in training mode: call ``.eval()`` for inference.
    """
    description = _description(payload)
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"cannot override {', '.join(unknown)} when loading a saved model; allowed: {', '.join(OVERRIDES)}")
    saved_fused = description["build_args"]["fused"]
    fuse_after = overrides.pop("fused", saved_fused)
    if saved_fused and not fuse_after:
        raise ValueError("the saved model is BN-fused and cannot be unfused; load it with fused=True (the default)")
    features_only = overrides.pop("features_only", description["features_only"])
    args = {**description["build_args"], **overrides}
    if not features_only and "out_indices" not in overrides:
        args.pop("out_indices", None)
    spec = ModelSpec.from_dict(description["spec"])
    model = create_model(spec, features_only=features_only, **args)
    load_checkpoint(model, payload["state_dict"])
    model.pretrained_cfg = {**_tuples(description["pretrained_cfg"]), "num_classes": model.num_classes}
    return fuse(model) if fuse_after and not saved_fused else model


def _description(payload: Mapping[str, Any]) -> dict[str, Any]:
    if not is_payload(payload):
        raise CheckpointError(f"not a saved selecsls model: no {PAYLOAD_KEY!r} description (a plain state dict? use load_model)")
    try:
        description = json.loads(payload[PAYLOAD_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the saved model description is not valid JSON ({exc})") from exc
    if description.get("format") != FORMAT or description.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"saved model format {description.get('format')!r} version {description.get('version')!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}; it was written by another selecsls release"
        )
    if not isinstance(payload.get("state_dict"), Mapping):
        raise CheckpointError("the saved model has a description but no 'state_dict' tensors")
    return description


def _tuples(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """JSON turned the pretrained_cfg tuples (input_size, mean, std) into lists; turn them back."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in cfg.items()}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (atomically): ``.safetensors`` or a weights-only torch file."""
    payload = to_payload(model)
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(payload["state_dict"], str(tmp), metadata={PAYLOAD_KEY: payload[PAYLOAD_KEY]})
    else:
        with atomic_write(path) as handle:
            torch.save(payload, handle)


def load(path: str | os.PathLike, **overrides: Any) -> SelecSLS:
    """The model saved at ``path`` by :func:`save` or by training (see :func:`from_payload` for ``overrides``)."""
    obj = read_file(path)
    if not is_payload(obj):
        raise CheckpointError(
            f"{os.fspath(path)} was not written by selecsls.save or training (no {PAYLOAD_KEY!r} description); "
            "for a plain state dict use selecsls.checkpoint.load_model(path, name) or create_model(name, checkpoint_path=path)"
        )
    return from_payload(obj, **overrides)
