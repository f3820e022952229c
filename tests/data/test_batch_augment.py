import math

import numpy as np
import pytest
import torch
from PIL import Image

from selecsls.data.batch_augment import BatchTrainAugment
from selecsls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform, seeded_generator


def _pixels(count=6, size=20, channels=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, channels, size, size), np.uint8))


def _augment(**settings):
    return BatchTrainAugment(build_train_transform(settings.pop("img_size", 16), **settings))


def test_output_shape_dtype_and_normalised_range():
    out = _augment(color_jitter=0.4)(_pixels(), seeded_generator(0, 0, 0))
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    low = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).reshape(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).reshape(1, 3, 1, 1)
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()


def test_grayscale_batches_keep_one_channel():
    out = _augment(in_chans=1, color_jitter=0.3)(_pixels(channels=1), seeded_generator(1))
    assert out.shape == (6, 1, 16, 16)


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    augment, pixels = _augment(color_jitter=0.2), _pixels()
    first = augment(pixels, seeded_generator(3, 1, 7))
    assert torch.equal(first, augment(pixels, seeded_generator(3, 1, 7)))
    assert not torch.equal(first, augment(pixels, seeded_generator(3, 1, 8)))


def test_crop_boxes_follow_the_random_resized_crop_rule():
    augment = _augment(scale=(0.3, 0.9), ratio=(0.5, 2.0))
    boxes = augment.crop_boxes(4000, 24, 32, seeded_generator(0))
    left, top, w, h = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 32).all() and (top + h <= 24).all()
    # Area and aspect drawn as TrainTransform draws them (up to rounding to whole pixels).
    area = w * h / (24 * 32)
    assert area.min() > 0.3 - 0.05 and area.max() < 0.9 + 0.05
    assert (w / h).min() > 0.5 * 0.85 and (w / h).max() < 2.0 / 0.85
    assert 0.3 < area.mean() < 0.7  # uniform in area, not collapsed on the fallback centre crop


def test_impossible_crops_fall_back_to_the_centre_crop_like_the_per_image_pipeline():
    # A 10x40 image cannot hold any box with aspect ratio near 1 and 90% of its area.
    settings = dict(scale=(0.9, 1.0), ratio=(0.9, 1.1))
    boxes = _augment(**settings).crop_boxes(5, 10, 40, seeded_generator(0))
    left, top, right, bottom = build_train_transform(16, **settings).crop_box((40, 10), seeded_generator(0))
    assert boxes.tolist() == [[left, top, right - left, bottom - top]] * 5


def test_flip_mirrors_the_same_crop():
    pixels = _pixels()
    plain = _augment(hflip=0.0)(pixels, seeded_generator(5))
    mirrored = _augment(hflip=1.0)(pixels, seeded_generator(5))
    assert torch.allclose(mirrored, plain.flip(-1), atol=1e-5)


def test_the_whole_image_crop_is_the_image_and_an_upscaled_crop_matches_pillow():
    pixels = _pixels(count=1, size=16)
    augment = _augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = augment(pixels, seeded_generator(0))
    assert torch.allclose(out, augment.transform.to_tensor.normalize(pixels), atol=1e-5)
    # A 10x10 box resized to 16x16: bilinear like Pillow's resize(box=...), to within rounding to 8 bits.
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    augment = _augment(scale=(100 / 256, 100 / 256), ratio=(1.0, 1.0), hflip=0.0)
    box = augment.crop_boxes(1, 16, 16, seeded_generator(2))
    assert box[0, 2:].tolist() == [10, 10]
    left, top = (int(v) for v in box[0, :2])
    expected = np.asarray(
        image.resize((16, 16), Image.Resampling.BILINEAR, box=(left, top, left + 10, top + 10)), np.float32
    )
    out = augment(pixels, seeded_generator(2))
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    restored = ((out[0] * std + mean) * 255).permute(1, 2, 0).numpy()
    assert np.abs(restored - expected).max() <= 1.0 + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_cuda_matches_the_cpu():
    augment, pixels = _augment(color_jitter=0.3), _pixels()
    on_cpu = augment(pixels, seeded_generator(9))
    on_gpu = augment(pixels.cuda(), seeded_generator(9))
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)


def test_jitter_factors_stay_in_range():
    augment = _augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.5)
    grey = torch.full((50, 3, 16, 16), 128, dtype=torch.uint8)
    out = augment(grey, seeded_generator(0))
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    level = ((out * std + mean) * 255).mean(dim=(1, 2, 3))
    # A flat grey image: contrast and saturation leave it, brightness scales it by [0.5, 1.5].
    assert level.min() >= 128 * 0.5 - 1e-3 and level.max() <= 128 * 1.5 + 1e-3
    assert level.max() - level.min() > 30 and not math.isnan(float(level.sum()))
