"""One image file, decoded safely: regular files only, failures as :class:`UnreadableImageError`, 8 bits."""

from __future__ import annotations

import os
import stat

import numpy as np
from PIL import Image

from selecsls._io import PathLike

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "is_regular_file", "open_image", "to_uint8"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UnreadableImageError(ValueError):
    """An image file that is missing, corrupt, truncated or not an image."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)


def is_regular_file(path: PathLike) -> bool:
    """True for a regular file (or a link to one): reading a FIFO or a device could block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_image(path: PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully (so errors surface here, not later in a transform).

    ``draft_size`` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) whose shorter side
    is still at least ``draft_size`` pixels: far faster for large photos that are then
    downscaled anyway. 16-bit and floating-point images come back as 8-bit images scaled
    to their range (:func:`to_uint8`), not clipped to white or black.
    """
    if not is_regular_file(path):
        raise UnreadableImageError(path, "no such file" if not os.path.lexists(path) else "not a regular file")
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                return Image.fromarray(to_uint8(np.asarray(image), 16 if image.mode.startswith("I;16") else None))
            return image
    except FileNotFoundError:
        raise UnreadableImageError(path, "no such file") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, str(exc) or type(exc).__name__) from None


#: Pillow modes with more than 8 bits per sample (16-bit PNG, 32-bit integer and float TIFF).
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_uint8(pixels: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Pixels of any depth as uint8 over their range: ``bits``-bit integers by their full scale;
    otherwise floats in [0, 1] times 255, values already in [0, 255] as they are, 16-bit ranges by
    65535, and anything else stretched from its minimum to its maximum. One rule for a whole array,
    so an IDX file's images stay comparable to each other."""
    if pixels.dtype == np.uint8:
        return pixels
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if bits is not None:
        scale, offset = 255 / (2**bits - 1), 0.0
    elif np.issubdtype(pixels.dtype, np.floating) and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= 65535 and np.issubdtype(pixels.dtype, np.integer):
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(high - low, 1e-12), low
    return np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)
