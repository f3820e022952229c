"""The one check of untrusted input, with every limit stated once.

Values from outside (a model file's description, a command-line option, an API argument) are checked
here before any work: a bad value is one :class:`InvalidInput` naming the value and the range, never a
silent fallback (``--crop-pct 0``), a crash after minutes of work, or an attempt to allocate terabytes
(``--img-size 100000``, a hand-made file declaring 16384-wide layers). The file formats' parsers
(:mod:`~selecsls.models.spec`, :mod:`~selecsls.models.card`) and the CLI use the same helpers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

from selecsls._io import printable

__all__ = [
    "CheckpointError",
    "InvalidInput",
    "check_bool",
    "check_choice",
    "check_area_fraction",
    "check_color_jitter",
    "check_crop_pct",
    "check_drop_rate",
    "check_fields",
    "check_image_channels",
    "check_img_side",
    "check_img_size",
    "check_int",
    "check_interpolation",
    "check_normalization",
    "check_num_classes",
    "check_number",
    "check_sequence",
    "check_text",
    "check_threshold",
    "estimated_activation_bytes",
    "json_object",
]

# ----------------------------------------------------------------------------------- limits
#: Widest conv a spec may declare (the published variants are at most 1280 wide).
MAX_WIDTH = 16384
#: Most conv weights a spec may declare, checked before anything is allocated (the largest
#: published variant has about 0.04e9): a hand-made spec cannot make a loader allocate gigabytes.
MAX_CONV_PARAMS = 2_000_000_000
MAX_BLOCKS = 256
MAX_HEAD_CONVS = 16
#: Most classifier outputs a model may have (ImageNet-21k has 21,843).
MAX_CLASSES = 100_000
MAX_TEXT = 1000
#: Longest name (of a spec, of a class).
MAX_NAME = 200
#: Feature levels ``out_indices`` may name (negative: from the end).
MAX_FEATURE_LEVELS = 16
#: Smallest input side accepted for a network (it downsamples 64 times; 16 px already ends at 1x1).
MIN_IMG_SIZE = 16
#: Largest input side, for a flag and a model file's ``input_size`` alike: eight times the published
#: 512 px, and a centre crop of at most 16.8 M pixels, far below what PIL refuses as a decompression
#: bomb (179 M).
MAX_IMG_SIZE = 4096
#: Smallest centre-crop fraction: eval resizes an image's shorter side to ``img_size / crop_pct``,
#: so this bounds that side at four times :data:`MAX_IMG_SIZE` (published models use 0.875 to 1).
MIN_CROP_PCT = 0.25
OUTPUT_STRIDES = (None, 8, 16, 32)
GLOBAL_POOLS = ("avg", "max", "")
#: Resampling filters the image pipelines offer, by the names timm's ``pretrained_cfg`` uses.
INTERPOLATIONS = ("bilinear", "bicubic")
#: Channels an image pipeline produces: grayscale or RGB (a network may read others; images do not have them).
IMAGE_CHANNELS = (1, 3)
#: Largest magnitude of a normalisation mean or std (ImageNet's are below 1, 0-255 pixel statistics below 256).
MAX_STATISTIC = 1e6
#: Activation bytes per input pixel (batch 1) of an inference forward pass, an upper estimate
#: from the published widths: the stem's 32 float32 maps at half resolution (32 bytes per input
#: pixel) and the first stage's ~600 channels at a quarter (~150 if all were alive at once).
INFERENCE_BYTES_PER_PIXEL = 200
#: Training keeps every activation for backward: roughly this many times the inference peak.
TRAINING_FACTOR = 8
#: Largest random seed (numpy's seed sequences and torch's generators both take it; seed + epoch still fits).
MAX_SEED = 2**32 - 1
#: Largest colour jitter: brightness, contrast and saturation factors in [1 - j, 1 + j] stay non-negative.
MAX_COLOR_JITTER = 1.0


class InvalidInput(ValueError):
    """A value from outside (a file, an option, an argument) that is not of its type or range."""


class CheckpointError(InvalidInput):
    """A model file that cannot be read, or whose contents do not fit the model they describe."""


# ---------------------------------------------------------------------------------- helpers
def check_int(name: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an integer, got {value!r:.40}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidInput(f"{name} must be {_range(low, high)}, got {value}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the given range (open at an end when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value!r:.40}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise InvalidInput(f"{name} must be {_range(low, high, low_open, high_open)}, got {value:g}")
    return float(value)


def _range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {_shown(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_shown(high)}"
    return f"in {'(' if low_open else '['}{_shown(low)}, {_shown(high)}{')' if high_open else ']'}"


def _shown(bound: float) -> str:
    """A range's end as written: integers in full (4294967295, not 4.29497e+09)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise InvalidInput(f"{name} must be one of {tuple(choices)}, got {value!r:.40}")
    return value


def check_text(name: str, value: Any, limit: int = MAX_TEXT, *, exact: bool = False) -> str:
    """Text of at most ``limit`` characters, made printable (it may reach a terminal) unless ``exact``:
    names that must match something outside (class folders) are kept as they are and escaped where printed."""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"{name} must be text of at most {limit} characters")
    return value if exact else printable(value)


def check_sequence(name: str, value: Any, lengths: Collection[int], what: str) -> tuple[Any, ...]:
    """A list (or tuple) of one of ``lengths`` items, as a tuple; ``what`` names the items in the message."""
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        counts = " or ".join(map(str, sorted(lengths))) if len(lengths) < 4 else f"at most {max(lengths)}"
        raise InvalidInput(f"{name} must be a list of {counts} {what}")
    return tuple(value)


def check_fields(
    name: str, data: Any, allowed: Collection[str], required: Collection[str] = (), noun: str = "key"
) -> Mapping[str, Any]:
    """A JSON object holding only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{name} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(printable(str(key))[:40] for key in set(data) - set(allowed))
    missing = sorted(set(required) - set(data))
    if unknown:
        raise InvalidInput(f"{name} has unknown {noun}(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if missing:
        raise InvalidInput(f"{name} lacks {noun}(s) {', '.join(missing)}")
    return data


def json_object(name: str, text: Any) -> dict[str, Any]:
    """``text`` parsed as a JSON object."""
    if not isinstance(text, str):
        raise InvalidInput(f"{name} is not text")
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInput(f"{name} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{name} is not a JSON object")
    return parsed


# ------------------------------------------------------------------------------ image sizes
def estimated_activation_bytes(img_size: int, batch: int = 1, training: bool = False) -> int:
    """A rough upper estimate of the activation memory one forward (and backward) pass needs."""
    return img_size * img_size * batch * INFERENCE_BYTES_PER_PIXEL * (TRAINING_FACTOR if training else 1)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate to compare with
        return None


def check_img_side(name: str, value: Any) -> int:
    """An image side in [:data:`MIN_IMG_SIZE`, :data:`MAX_IMG_SIZE`]: a model file's ``input_size`` and every
    ``--img-size`` (:func:`check_img_size`) meet the same limits."""
    return check_int(name, value, MIN_IMG_SIZE, MAX_IMG_SIZE)


def check_img_size(
    value: Any, name: str = "--img-size", batch: int = 1, training: bool = False, batch_name: str = "--batch-size"
) -> int:
    """An image side (:func:`check_img_side`) whose activations at ``batch`` also fit this machine's memory.

    Memory is checked before the upper limit, so a size far out of range says what it would need; the
    advice names what is too large: the batch (``batch_name``) when one image of this size fits.
    """
    check_int(name, value, MIN_IMG_SIZE)
    needed, available = estimated_activation_bytes(value, batch, training), _physical_memory()
    if available is not None and needed > available:
        fitting = available // estimated_activation_bytes(value, 1, training)
        advice = (
            f"use {batch_name} {fitting} or less at this size"
            if fitting
            else f"use a smaller {name} (the published models use 224)"
        )
        raise InvalidInput(
            f"{name} {value} at batch {batch} needs about {needed / 2**30:,.0f} GiB of activation memory, more than "
            f"this machine's {available / 2**30:,.0f} GiB; {advice}"
        )
    return check_img_side(name, value)


def check_crop_pct(name: str, value: Any) -> float:
    """A centre-crop fraction in [:data:`MIN_CROP_PCT`, 1], for a model file's ``crop_pct``, ``--crop-pct`` and a
    tensor cache's geometry."""
    return check_number(name, value, MIN_CROP_PCT, 1.0)


# ------------------------------------------------------------------ models and image pipelines
def check_num_classes(name: str, value: Any) -> int:
    """Classifier outputs: 0 (no classifier) to :data:`MAX_CLASSES`."""
    return check_int(name, value, 0, MAX_CLASSES)


def check_drop_rate(name: str, value: Any) -> float:
    """Dropout before the classifier: a probability below 1 (at 1 every feature would be zeroed)."""
    return check_number(name, value, 0.0, 1.0, high_open=True)


def check_threshold(name: str, value: Any) -> float:
    """A pruning threshold on filter norms (or BN scales): >= 0 (0 removes only exactly-dead channels)."""
    return check_number(name, value, 0.0)


def check_area_fraction(name: str, value: Any) -> float:
    """A random crop's share of the image area, in (0, 1]: ``--min-crop-area`` and each end of ``scale``."""
    return check_number(name, value, 0.0, 1.0, low_open=True)


def check_color_jitter(name: str, value: Any) -> float:
    """Colour jitter in [0, :data:`MAX_COLOR_JITTER`]."""
    return check_number(name, value, 0.0, MAX_COLOR_JITTER)


def check_interpolation(name: str, value: Any) -> str:
    """A resampling filter the image pipelines offer (:data:`INTERPOLATIONS`)."""
    return check_choice(name, value, INTERPOLATIONS)


def check_image_channels(name: str, value: Any) -> int:
    """Channels of a model's images: 1 (grayscale) or 3 (RGB) (:data:`IMAGE_CHANNELS`)."""
    return check_choice(name, value, IMAGE_CHANNELS)


def check_normalization(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation statistics, 1 or 3 finite numbers each, ``std`` positive: for a model file's
    card and the image pipelines alike."""
    mean, std = _statistics("mean", mean), _statistics("std", std)
    if min(std) <= 0:
        raise InvalidInput(f"std must be positive, got {std}")
    return mean, std


def _statistics(name: str, values: Any) -> tuple[float, ...]:
    values = check_sequence(name, values, (1, 3), "numbers")
    return tuple(check_number(name, value, -MAX_STATISTIC, MAX_STATISTIC) for value in values)
