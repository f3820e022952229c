"""Image preprocessing without torchvision: the standard ImageNet train and eval pipelines.

Both pipelines are callables ``PIL.Image -> float tensor (C, H, W)`` built from Pillow,
numpy and torch only. Training randomness comes from an optional ``torch.Generator`` so a
data loader can make every sample's augmentation a function of (seed, epoch, index) and a
resumed run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from selecsls.models.card import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from selecsls.models.validation import INTERPOLATIONS as INTERPOLATION_NAMES
from selecsls.models.validation import (
    InvalidInput,
    check_area_fraction,
    check_color_jitter,
    check_crop_pct,
    check_image_channels,
    check_img_side,
    check_interpolation,
    check_normalization,
    check_number,
    check_sequence,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "EvalTransform",
    "TrainTransform",
    "build_eval_transform",
    "build_train_transform",
    "centre_box",
    "eval_transform_for",
    "seeded_generator",
]

#: Resampling filters accepted by the pipelines, by the names timm's ``pretrained_cfg`` uses.
INTERPOLATIONS = {name: Image.Resampling[name.upper()] for name in INTERPOLATION_NAMES}


class ToUint8Tensor:
    """PIL image -> (in_chans, H, W) uint8 tensor: the pixels as decoded (what a tensor cache stores).

    Grayscale sources are expanded to three channels (and colour reduced to luminance for
    ``in_chans=1``), so one dataset feeds models built for either.
    """

    def __init__(self, in_chans: int) -> None:
        self.mode = "L" if check_image_channels("in_chans", in_chans) == 1 else "RGB"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert(self.mode), dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        # np.array copies: a contiguous transpose (one channel) would otherwise share Pillow's read-only buffer
        return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


class Normalize:
    """uint8 pixels (C, H, W) or (N, C, H, W), on any device -> float32 scaled to [0, 1], then by mean/std."""

    def __init__(self, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> None:
        in_chans, (mean, std) = check_image_channels("in_chans", in_chans), check_normalization(mean, std)
        self.mean, self.std = _per_channel(mean, in_chans), _per_channel(std, in_chans)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.float() / 255.0 - mean) / std


class _ToNormalizedTensor:
    """PIL image -> (in_chans, H, W) float tensor, normalised by per-channel mean/std."""

    def __init__(self, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.to_uint8 = ToUint8Tensor(in_chans)
        self.normalize = Normalize(in_chans, mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))


def _per_channel(values: tuple[float, ...], in_chans: int) -> torch.Tensor:
    """Statistics (1 or 3 values) for 1 or 3 channels as a (C, 1, 1) tensor: one value serves every channel, RGB
    statistics collapse to their average for grayscale."""
    if len(values) != in_chans:
        values = (sum(values) / len(values),) * in_chans
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def _resampling(interpolation: str) -> Image.Resampling:
    return INTERPOLATIONS[check_interpolation("interpolation", interpolation)]


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise."""

    img_size: int
    crop_pct: float
    interpolation: str
    to_tensor: _ToNormalizedTensor

    @property
    def resize_size(self) -> int:
        return math.floor(self.img_size / self.crop_pct)

    @property
    def draft_size(self) -> int:
        """Smallest shorter side a JPEG may be decoded at (draft mode) without changing the result much."""
        return self.resize_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        new_size = (max(self.resize_size, round(width * scale)), max(self.resize_size, round(height * scale)))
        image = image.resize(new_size, _resampling(self.interpolation))
        left = (new_size[0] - self.img_size) // 2
        top = (new_size[1] - self.img_size) // 2
        return self.to_tensor(image.crop((left, top, left + self.img_size, top + self.img_size)))


@dataclass(frozen=True)
class TrainTransform:
    """Random-resized crop, horizontal flip, optional colour jitter, normalise.

    The crop follows the ImageNet recipe: an area fraction in ``scale`` and an aspect ratio
    log-uniform in ``ratio`` (ten tries, then a centre crop clamped to the ratio range).
    """

    img_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    color_jitter: float
    interpolation: str
    to_tensor: _ToNormalizedTensor

    draft_size = None  # random crops may zoom into a small region: always decode at full resolution

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        box = self.crop_box(image.size, generator)
        image = image.resize((self.img_size, self.img_size), _resampling(self.interpolation), box=box)
        if _uniform(generator) < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            image = self._jitter(image, generator)
        return self.to_tensor(image)

    def crop_box(self, size: tuple[int, int], generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the random crop for an image of ``size`` (width, height)."""
        width, height = size
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, *log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(_uniform(generator) * (width - w + 1))
                top = int(_uniform(generator) * (height - h + 1))
                return left, top, left + w, top + h
        left, top, w, h = centre_box(height, width, self.ratio)
        return left, top, left + w, top + h

    def _jitter(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        """Brightness, contrast and saturation each scaled by a factor in [1 - j, 1 + j]."""
        low, high = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhancer(image).enhance(_uniform(generator, low, high))
        return image


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator that is a pure function of ``keys`` (seed, epoch, index or step, ...): augmentation
    that does not depend on worker count, batch order, device or resumption."""
    state = np.random.SeedSequence([int(key) for key in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def centre_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the centred crop with the aspect ratio clamped to ``ratio``: where a
    random-resized crop falls back when no random box fits."""
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    return (width - w) // 2, (height - h) // 2, w, h


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def build_eval_transform(
    img_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    in_chans: int = 3,
) -> EvalTransform:
    """The evaluation pipeline ImageNet papers report with (resize, centre crop, normalise)."""
    _resampling(interpolation)
    return EvalTransform(
        check_img_side("img_size", img_size),
        check_crop_pct("crop_pct", crop_pct),
        interpolation,
        _ToNormalizedTensor(in_chans, mean, std),
    )


def build_train_transform(
    img_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    in_chans: int = 3,
) -> TrainTransform:
    """The training pipeline: random-resized crop, flip, optional colour jitter, normalise."""
    scale = _ordered("scale", scale, check_area_fraction)
    ratio = _ordered("ratio", ratio, lambda name, end: check_number(name, end, 0.0, low_open=True))
    _resampling(interpolation)
    return TrainTransform(
        check_img_side("img_size", img_size),
        scale,
        ratio,
        check_number("hflip", hflip, 0.0, 1.0),
        check_color_jitter("color_jitter", color_jitter),
        interpolation,
        _ToNormalizedTensor(in_chans, mean, std),
    )


def _ordered(name: str, ends: Any, check: Callable[[str, Any], float]) -> tuple[float, float]:
    """A (min, max) range: two values, each passing ``check``, the first at most the second."""
    low, high = (check(name, end) for end in check_sequence(name, ends, (2,), "numbers (min, max)"))
    if low > high:
        raise InvalidInput(f"{name} must be (min, max) with min <= max, got ({low:g}, {high:g})")
    return low, high


def eval_transform_for(
    preprocessing: Preprocessing,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> EvalTransform:
    """The eval pipeline a model expects (``model.card.preprocessing``); arguments given override it."""
    in_chans, _, card_size = preprocessing.input_size
    return build_eval_transform(
        img_size if img_size is not None else card_size,
        crop_pct if crop_pct is not None else preprocessing.crop_pct,
        interpolation if interpolation is not None else preprocessing.interpolation,
        preprocessing.mean,
        preprocessing.std,
        in_chans,
    )
