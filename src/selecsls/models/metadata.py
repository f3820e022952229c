"""The description stored in a model file, checked against a strict schema before anything is built.

A file is data from anywhere: its description may only hold the keys :func:`~selecsls.models.serialization.save`
writes, with the types and ranges a real model has, and its spec must match the stored weights'
shapes. Everything is checked before a single layer is allocated, so a hand-made file can neither
pass arbitrary arguments to ``create_model`` (``checkpoint_path`` would open another file) nor make
the loader allocate gigabytes, and class names reach the terminal without control characters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor

from selecsls._io import printable
from selecsls.models.checkpoint import CheckpointError, conv_weight_shapes
from selecsls.models.network import GLOBAL_POOLS
from selecsls.models.spec import MAX_WIDTH, ModelSpec, SpecError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SavedDescription",
    "check_pretrained_cfg",
    "json_object",
    "parse_description",
]

FORMAT = "selecsls.model"
FORMAT_VERSION = 1
#: Most classifier outputs a saved model may declare (ImageNet-21k has 21,843).
MAX_CLASSES = 100_000
MAX_TEXT = 1000
MAX_CLASS_NAME = 200
_DESCRIPTION_KEYS = {"format", "version", "spec", "features_only", "build_args", "pretrained_cfg"}
_OUTPUT_STRIDES = (None, 8, 16, 32)


class SavedDescription(NamedTuple):
    """A checked description: the spec and the arguments that rebuild the saved model."""

    spec: ModelSpec
    features_only: bool
    build_args: dict[str, Any]
    pretrained_cfg: dict[str, Any]


def parse_description(text: Any, state: Mapping[str, Tensor]) -> SavedDescription:
    """The description JSON ``text`` stored beside the tensors ``state``, checked; else one CheckpointError."""
    description = json_object(text, "the saved model description")
    if description.get("format") != FORMAT or description.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"saved model format {description.get('format')!r:.40} version "
            f"{description.get('version')!r:.40} is not {FORMAT!r} version {FORMAT_VERSION}; "
            "it was written by another selecsls release"
        )
    _keys(description, "the saved model description", _DESCRIPTION_KEYS, required=_DESCRIPTION_KEYS)
    features_only = description["features_only"]
    if not isinstance(features_only, bool):
        raise CheckpointError("the saved model description: features_only must be true or false")
    try:
        spec = ModelSpec.from_dict(description["spec"])
    except SpecError as exc:
        raise CheckpointError(f"the saved model description: {exc}") from None
    build_args = _build_args(description["build_args"], features_only)
    _check_weights_fit(spec, build_args, features_only, state)
    num_classes = build_args.get("num_classes", 1000) if not features_only else 0
    pretrained_cfg = check_pretrained_cfg(description["pretrained_cfg"], num_classes, "the saved model description")
    return SavedDescription(spec, features_only, build_args, pretrained_cfg)


def json_object(text: Any, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or one CheckpointError saying what it is instead."""
    if not isinstance(text, str):
        raise CheckpointError(f"{what} is not text")
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{what} is not a JSON object")
    return parsed


def _keys(data: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown, missing = sorted(printable(key) for key in set(data) - allowed), sorted(required - set(data))
    if unknown:
        raise CheckpointError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if missing:
        raise CheckpointError(f"{where} lacks key(s) {', '.join(missing)}")


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{where} must be an integer in {low}..{high}, got {value!r:.40}")
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where} must be a finite number, got {value!r:.40}")
    if not low <= value <= high:
        raise CheckpointError(f"{where} must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


def _text(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise CheckpointError(f"{where} must be text of at most {limit} characters")
    return printable(value)


def _build_args(args: Any, features_only: bool) -> dict[str, Any]:
    """Only the ``create_model`` arguments that describe the architecture, each of its type and range."""
    where = "the saved model's build_args"
    allowed = {"drop_rate", "output_stride", "fused"} | (
        {"out_indices"} if features_only else {"num_classes", "global_pool"}
    )
    _keys(args, where, allowed, required={"fused"})
    if not isinstance(args["fused"], bool):
        raise CheckpointError(f"{where}: fused must be true or false")
    if "num_classes" in args:
        _integer(args["num_classes"], f"{where}: num_classes", 0, MAX_CLASSES)
    if "drop_rate" in args:
        _number(args["drop_rate"], f"{where}: drop_rate", 0.0, 0.999)
    if "global_pool" in args and args["global_pool"] not in GLOBAL_POOLS:
        raise CheckpointError(f"{where}: global_pool must be one of {GLOBAL_POOLS}")
    if args.get("output_stride") not in _OUTPUT_STRIDES:
        raise CheckpointError(f"{where}: output_stride must be one of {_OUTPUT_STRIDES}")
    if "out_indices" in args:
        indices = args["out_indices"]
        if not isinstance(indices, list) or len(indices) > 16:
            raise CheckpointError(f"{where}: out_indices must be a list of feature levels")
        args = {**args, "out_indices": [_integer(i, f"{where}: out_indices", -16, 15) for i in indices]}
    return dict(args)


def _check_weights_fit(
    spec: ModelSpec, build_args: Mapping[str, Any], features_only: bool, state: Mapping[str, Tensor]
) -> None:
    """The spec must describe the stored tensors (checked on shapes: nothing is allocated)."""
    for key, shape in conv_weight_shapes(spec).items():
        stored = state.get(key)
        if not isinstance(stored, Tensor) or tuple(stored.shape) != shape:
            found = "missing" if not isinstance(stored, Tensor) else tuple(stored.shape)
            raise CheckpointError(
                f"the saved model description does not match its weights: {key} should be {shape}, is {found}"
            )
    num_classes = 0 if features_only else build_args.get("num_classes", 1000)
    classifier = state.get("fc.weight")
    found = tuple(classifier.shape) if isinstance(classifier, Tensor) else "missing"
    if num_classes and found != (num_classes, spec.num_features):
        raise CheckpointError(
            f"the saved model description declares {num_classes} classes but its classifier fc.weight is {found}"
        )


def check_pretrained_cfg(cfg: Any, num_classes: int, where: str) -> dict[str, Any]:
    """``pretrained_cfg`` (preprocessing, provenance, class names) checked, as tuples, names made printable."""
    where = f"{where}: pretrained_cfg"
    _keys(cfg, where, set(_CFG_CHECKS), required={"input_size"})
    return {key: _CFG_CHECKS[key](value, f"{where}.{key}", num_classes) for key, value in cfg.items()}


def _size_list(length: int, low: int, high: int):
    def check(value: Any, where: str, _: int) -> tuple[int, ...]:
        if not isinstance(value, list | tuple) or len(value) != length:
            raise CheckpointError(f"{where} must be a list of {length} integers")
        return tuple(_integer(v, where, low, high) for v in value)

    return check


def _statistics(value: Any, where: str, _: int) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or len(value) not in (1, 3):
        raise CheckpointError(f"{where} must be a list of 1 or 3 numbers")
    return tuple(_number(v, where, -1e6, 1e6) for v in value)


def _std(value: Any, where: str, num_classes: int) -> tuple[float, ...]:
    std = _statistics(value, where, num_classes)
    if min(std) <= 0:
        raise CheckpointError(f"{where} must be positive")
    return std


def _label_names(value: Any, where: str, num_classes: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) != num_classes:
        raise CheckpointError(f"{where} must be a list of {num_classes} class names, one per output")
    return tuple(_text(name, where, MAX_CLASS_NAME) for name in value)


def _checked_text(value: Any, where: str, _: int) -> str | None:
    return None if value is None else _text(value, where)


#: Every key a pretrained_cfg may hold (timm's vocabulary plus the class names) and its check.
_CFG_CHECKS = {
    "architecture": _checked_text,  # text or null (a baseline names no first conv or classifier)
    "tag": _checked_text,
    "url": _checked_text,
    "first_conv": _checked_text,
    "classifier": _checked_text,
    "interpolation": _checked_text,
    "input_size": _size_list(3, 1, MAX_WIDTH),
    "pool_size": _size_list(2, 1, MAX_WIDTH),
    "crop_pct": lambda value, where, _: _number(value, where, 1e-3, 1.0),
    "mean": _statistics,
    "std": _std,
    "num_classes": lambda value, where, _: _integer(value, where, 0, MAX_CLASSES),
    "top1": lambda value, where, _: _number(value, where, 0.0, 100.0),
    "top5": lambda value, where, _: _number(value, where, 0.0, 100.0),
    "label_names": _label_names,
}
