"""``save`` / ``load``: a model stored as data (spec, build arguments, preprocessing, weights);
``load`` also reads every other model file (plain state dicts of any layout, baseline checkpoints).

The file rebuilds the model on its own: no pickled classes, so it loads with
``weights_only=True`` and survives refactors. The description is JSON text under one key
(``"selecsls"``) next to the ``"state_dict"`` tensors; a ``.safetensors`` path keeps the
same JSON in the file's metadata. Training checkpoints embed the same payload
(``{**to_payload(model), "optimizer": ...}``), so :func:`load` reads them too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selecsls._io import OutputError, atomic_path, atomic_write, one_line
from selecsls._optional import require
from selecsls.models.baselines import list_baselines
from selecsls.models.checkpoint import (
    CheckpointError,
    build_args_of,
    check_finite,
    fitting_variants,
    is_fused,
    load_checkpoint,
    read_file,
    read_state_dict,
    unwrap_state_dict,
)
from selecsls.models.factory import create_model, list_models
from selecsls.models.fusion import fuse
from selecsls.models.metadata import FORMAT, FORMAT_VERSION, check_pretrained_cfg, json_object, parse_description
from selecsls.models.network import SelecSLS, SelecSLSFeatures

__all__ = [
    "BASELINE_KEY",
    "FORMAT",
    "PAYLOAD_KEY",
    "baseline_payload",
    "from_payload",
    "is_payload",
    "load",
    "model_from_checkpoint",
    "save",
    "to_payload",
]

#: Key of the JSON description in a payload (and in safetensors metadata).
PAYLOAD_KEY = "selecsls"
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
        "pretrained_cfg": _saveable_cfg(model),
    }
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    return {PAYLOAD_KEY: json.dumps(description, sort_keys=True), "state_dict": state}


def _saveable_cfg(model: nn.Module) -> dict[str, Any]:
    """``model.pretrained_cfg`` as JSON data, checked by the schema ``load`` applies: a model never
    saves what it cannot load back."""
    cfg = json.loads(json.dumps(model.pretrained_cfg))
    check_pretrained_cfg(cfg, model.num_classes, "the model")
    return cfg


def is_payload(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get(PAYLOAD_KEY), str)


def from_payload(payload: Mapping[str, Any], **overrides: Any) -> SelecSLS:
    """Rebuild the model a payload describes; ``overrides`` change build arguments.

    ``num_classes`` re-initialises the classifier (with a warning); ``features_only=True``
    drops it; ``fused=True`` folds BatchNorm after loading. Unfusing is impossible. Like
    ``create_model``, the model comes back in training mode: call ``.eval()`` for inference.
    The description is checked against a strict schema (:mod:`selecsls.models.metadata`) first.
    """
    if not is_payload(payload):
        raise CheckpointError(
            f"not a saved selecsls model: no {PAYLOAD_KEY!r} description (a plain state dict? use selecsls.load)"
        )
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError("the saved model has a description but no 'state_dict' tensors")
    description = parse_description(payload[PAYLOAD_KEY], state)
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(
            f"cannot override {', '.join(unknown)} when loading a saved model; allowed: {', '.join(OVERRIDES)}"
        )
    saved_fused = description.build_args["fused"]
    fuse_after = overrides.pop("fused", saved_fused)
    if saved_fused and not fuse_after:
        raise ValueError("the saved model is BN-fused and cannot be unfused; load it with fused=True (the default)")
    features_only = overrides.pop("features_only", description.features_only)
    args = {**description.build_args, **overrides}
    if not features_only and "out_indices" not in overrides:
        args.pop("out_indices", None)
    model = create_model(description.spec, features_only=features_only, **args)
    load_checkpoint(model, state)
    cfg = dict(description.pretrained_cfg)
    if len(cfg.get("label_names", ())) != model.num_classes:  # a new classifier: the names were the old one's
        cfg.pop("label_names", None)
    model.pretrained_cfg = {**cfg, "num_classes": model.num_classes}
    return fuse(model) if fuse_after and not saved_fused else model


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (atomically): ``.safetensors`` or a weights-only torch file."""
    payload = to_payload(model)
    if os.fspath(path).endswith(".safetensors"):
        save_file = require("safetensors.torch", "to write .safetensors files").save_file
        SafetensorError = require("safetensors", "to write .safetensors files").SafetensorError

        with atomic_path(path) as tmp:
            try:
                save_file(payload["state_dict"], str(tmp), metadata={PAYLOAD_KEY: payload[PAYLOAD_KEY]})
            except SafetensorError as exc:  # safetensors reports a full disk as its own error type
                raise OutputError(f"cannot write {os.fspath(path)}: {exc} (nothing was written)") from exc
    else:
        with atomic_write(path) as handle:
            torch.save(payload, handle)


def load(path: str | os.PathLike, name: str | None = None, **overrides: Any) -> nn.Module:
    """Any model file -> a ready model: the one loader behind eval, prune, export and predict.

    A file written by :func:`save` or by training is rebuilt from its own description
    (``name`` is not needed; see :func:`from_payload` for ``overrides``). A training
    checkpoint of a baseline rebuilds that baseline. A plain state dict of any layout
    builds ``name`` or, when ``name`` is None, the published variant its tensor shapes
    fit, with the checkpoint's classes, input channels and fusion unless ``overrides``
    (any :func:`create_model` argument) say otherwise. The file is read once.
    """
    obj = read_file(path)
    if is_payload(obj) or isinstance(obj.get(BASELINE_KEY), str):
        return model_from_checkpoint(obj, os.fspath(path), **overrides)
    state = read_state_dict(obj)
    if name is None:
        fits = fitting_variants(state)
        if not fits:
            raise CheckpointError(
                f"{os.fspath(path)}: its tensor shapes fit no published variant ({', '.join(list_models())}); pass "
                "the model name (--model NAME) if it is one of them with other keys, or load a pruned model from "
                "the file selecsls.save / selecsls prune wrote"
            )
        name = fits[0]
    args = build_args_of(state) | overrides
    fold_after_loading = bool(args.get("fused")) and not is_fused(state)
    model = create_model(name, **(args | {"fused": args.get("fused", False) and not fold_after_loading}))
    load_checkpoint(model, state, source=os.fspath(path))
    return fuse(model) if fold_after_loading else model


#: Key naming the baseline architecture in a training checkpoint of a baseline (no spec to store).
BASELINE_KEY = "baseline"


def baseline_payload(model: nn.Module, name: str) -> dict[str, Any]:
    """Checkpoint entries of a baseline: its registry name, preprocessing metadata (JSON) and CPU weights."""
    return {
        BASELINE_KEY: name,
        "pretrained_cfg": json.dumps(_saveable_cfg(model)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def model_from_checkpoint(obj: Mapping[str, Any], source: str = "checkpoint", **overrides: Any) -> nn.Module:
    """The model of a file written by :func:`save` or training (a SelecSLS payload or a baseline's entries)."""
    if is_payload(obj):
        return from_payload(obj, **overrides)
    name = obj[BASELINE_KEY]
    if name not in list_baselines():
        raise CheckpointError(f"{source} names an unknown baseline {name!r:.40}; known: {', '.join(list_baselines())}")
    state = unwrap_state_dict(obj, source)
    check_finite(state, source)
    linear_weights = [tensor for tensor in state.values() if tensor.dim() == 2]  # the classifier
    num_classes = linear_weights[-1].shape[0] if linear_weights else 1000
    if any(key != "num_classes" or value != num_classes for key, value in overrides.items()):
        raise ValueError(f"{source} holds a {name} baseline, which loads as saved; drop {', '.join(overrides)}")
    model = create_model(name, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the {name} baseline ({one_line(exc)})") from None
    if "pretrained_cfg" in obj:  # absent in checkpoints of earlier releases
        cfg = json_object(obj["pretrained_cfg"], f"{source}: pretrained_cfg")
        model.pretrained_cfg = check_pretrained_cfg(cfg, num_classes, source)
    return model
