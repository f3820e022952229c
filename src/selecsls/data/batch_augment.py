"""The training augmentation of :class:`~selecsls.data.transforms.TrainTransform`, batched on the device.

For cached uint8 batches (:mod:`selecsls.data.tensor_cache`): random-resized crop and
horizontal flip as one ``grid_sample`` per batch, colour jitter as per-image blends, then
normalisation, all on the tensor's device. The settings are the per-image pipeline's own
(``TrainTransform``: same scale, ratio, flip probability, jitter, interpolation, mean/std), and
the crop parameters are drawn by the same rule (ten tries, then a centre crop), so both paths
sample the same augmentation distribution; pixel values differ slightly (PIL resizes with an
antialiasing filter and rounds to 8 bits after each jitter step, this path does neither).

Randomness comes from a CPU generator the caller seeds per batch
(:func:`~selecsls.data.transforms.seeded_generator`), so a batch's augmentation depends only on
(seed, epoch, step, rank), whatever the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selecsls.data.transforms import TrainTransform, centre_box

__all__ = ["BatchTrainAugment"]

#: ITU-R 601-2 luma weights, as Pillow's RGB -> L conversion uses them.
LUMA = (0.299, 0.587, 0.114)
_TRIES = 10


class BatchTrainAugment:
    """``TrainTransform``'s crop, flip, jitter and normalisation for a uint8 batch (N, C, H, W)."""

    def __init__(self, transform: TrainTransform) -> None:
        self.transform = transform

    def crop_boxes(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 4) float boxes (left, top, w, h) in pixels, by ``TrainTransform.crop_box``'s rule."""
        t = self.transform
        area = torch.full((count, _TRIES), float(height * width), dtype=torch.float64)
        target_area = area * _uniform((count, _TRIES), generator, *t.scale)
        aspect = torch.exp(_uniform((count, _TRIES), generator, math.log(t.ratio[0]), math.log(t.ratio[1])))
        w = torch.round(torch.sqrt(target_area * aspect))
        h = torch.round(torch.sqrt(target_area / aspect))
        left = torch.floor(_uniform((count, _TRIES), generator) * (width - w + 1))
        top = torch.floor(_uniform((count, _TRIES), generator) * (height - h + 1))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits, as the loop takes
        boxes = torch.stack([left, top, w, h], dim=2).gather(1, first[:, :, None].expand(-1, 1, 4))[:, 0]
        fallback = torch.tensor(centre_box(height, width, t.ratio), dtype=torch.float64)
        return torch.where(valid.any(dim=1, keepdim=True), boxes, fallback)

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augmented, normalised float32 batch (N, C, img_size, img_size) on ``pixels``' device."""
        t = self.transform
        count, _, height, width = pixels.shape
        boxes = self.crop_boxes(count, height, width, generator)
        flip = _uniform((count,), generator) < t.hflip
        grid = _crop_grid(boxes, flip, height, width, t.img_size).to(pixels.device)
        images = F.grid_sample(pixels.float(), grid, mode=t.interpolation, padding_mode="border", align_corners=False)
        images = images.clamp_(0, 255)  # bicubic overshoots, as PIL clips
        if t.color_jitter > 0:
            images = self._jitter(images, generator)
        return t.to_tensor.normalize(images)

    def _jitter(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation factors in [1 - j, 1 + j], in ``TrainTransform``'s order."""
        low, high = max(0.0, 1 - self.transform.color_jitter), 1 + self.transform.color_jitter
        factors = _uniform((3, len(images), 1, 1, 1), generator, low, high).to(images.device, torch.float32)
        images = (images * factors[0]).clamp_(0, 255)
        mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)
        images = (mean + factors[1] * (images - mean)).clamp_(0, 255)
        if images.shape[1] == 3:
            gray = _luma(images)
            images = (gray + factors[2] * (images - gray)).clamp_(0, 255)
        return images


def _crop_grid(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int, size: int) -> torch.Tensor:
    """``grid_sample``'s (N, size, size, 2) sampling grid for axis-aligned crop boxes, in the
    normalised coordinates of ``align_corners=False``: output pixel centres spread evenly over
    each box (mirrored where ``flip``), as a resize of the box does."""
    left, top, w, h = (column[:, None] for column in boxes.unbind(1))
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # (size,) in (0, 1)
    xs = torch.where(flip[:, None], 1 - centres, centres)
    x = (2 * (left + xs * w) / width - 1).float()  # (N, size)
    y = (2 * (top + centres * h) / height - 1).float()
    count = len(boxes)
    return torch.stack([x[:, None, :].expand(count, size, size), y[:, :, None].expand(count, size, size)], dim=3)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _luma(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)
