"""Ranges of the numbers users give (CLI options and API arguments), checked in one place before any work.

Every entry point (training, eval, export, prune, predict) validates its numbers with these
helpers, so a bad value is one clear error up front: never a silent fallback to a default
(``--crop-pct 0``), never a crash after minutes of work, never an attempt to allocate
terabytes (``--img-size 100000``).
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["MIN_IMG_SIZE", "check_img_size", "check_int", "check_number", "estimated_activation_bytes"]

#: Smallest input side accepted for a network (it downsamples 64 times; 16 px already ends at 1x1).
MIN_IMG_SIZE = 16
#: Activation bytes per input pixel (batch 1) of an inference forward pass, an upper estimate
#: from the published widths: the stem's 32 float32 maps at half resolution (32 bytes per input
#: pixel) and the first stage's ~600 channels at a quarter (~150 if all were alive at once).
INFERENCE_BYTES_PER_PIXEL = 200
#: Training keeps every activation for backward: roughly this many times the inference peak.
TRAINING_FACTOR = 8


def check_int(name: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a ValueError naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range(low, high)}, got {value}")
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
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_range(low, high, low_open, high_open)}, got {value:g}")
    return float(value)


def _range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def estimated_activation_bytes(img_size: int, batch: int = 1, training: bool = False) -> int:
    """A rough upper estimate of the activation memory one forward (and backward) pass needs."""
    return img_size * img_size * batch * INFERENCE_BYTES_PER_PIXEL * (TRAINING_FACTOR if training else 1)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate to compare with
        return None


def check_img_size(value: Any, name: str = "--img-size", batch: int = 1, training: bool = False) -> int:
    """An input side of at least :data:`MIN_IMG_SIZE` whose activations fit this machine's memory."""
    check_int(name, value, MIN_IMG_SIZE)
    needed, available = estimated_activation_bytes(value, batch, training), _physical_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"{name} {value} at batch {batch} needs about {needed / 2**30:,.0f} GiB of activation memory, more than "
            f"this machine's {available / 2**30:,.0f} GiB; use a smaller {name} (the published models use 224)"
        )
    return value
