import numpy as np
import pytest
import torch
from PIL import Image

from selecsls import create_model
from selecsls.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    eval_transform_for,
)


def _solid(colour, size=(50, 40), mode="RGB"):
    return Image.new(mode, size, colour)


def _normalised(value, mean, std):
    return (value / 255.0 - mean) / std


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    # Left third red, rest blue; the shorter side becomes floor(32 / 0.875) = 36.
    pixels = np.zeros((60, 90, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    transform = build_eval_transform(32, crop_pct=0.875)
    assert transform.resize_size == 36
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Resized to 54x36: red ends at column 18; the crop starts at (54 - 32) // 2 = 11.
    red = out[0, 16] > 0
    assert red[:5].all() and not red[9:].any()


def test_eval_transform_normalises_with_imagenet_statistics():
    out = build_eval_transform(16)(_solid((255, 128, 0)))
    expected = [_normalised(v, m, s) for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out.mean((1, 2)), torch.tensor(expected), atol=1e-5)


def test_grayscale_is_expanded_to_three_channels_and_colour_reduced_to_one():
    rgb = build_eval_transform(16)(_solid(100, mode="L"))
    assert rgb.shape == (3, 16, 16)
    assert torch.allclose(
        rgb * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.full_like(rgb, 100 / 255),
        atol=1e-5,
    )
    gray = build_eval_transform(16, in_chans=1)(_solid((100, 100, 100)))
    assert gray.shape == (1, 16, 16)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    assert torch.allclose(gray, torch.full_like(gray, _normalised(100, mean, std)), atol=1e-5)


def test_bicubic_and_bilinear_differ_on_detail():
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    bilinear = build_eval_transform(24, interpolation="bilinear")(image)
    bicubic = build_eval_transform(24, interpolation="bicubic")(image)
    assert bilinear.shape == bicubic.shape and not torch.allclose(bilinear, bicubic)


def test_eval_transform_from_model_cfg_and_overrides():
    model = create_model("selecsls42b", num_classes=3)
    transform = eval_transform_for(model.card.preprocessing)
    assert (transform.img_size, transform.crop_pct, transform.interpolation) == (224, 0.875, "bilinear")
    small = eval_transform_for(model.card.preprocessing, img_size=32, crop_pct=1.0, interpolation="bicubic")
    assert (small.img_size, small.resize_size, small.interpolation) == (32, 32, "bicubic")


def test_train_transform_is_a_function_of_its_generator():
    image = Image.fromarray((np.random.default_rng(1).random((48, 64, 3)) * 255).astype(np.uint8))
    transform = build_train_transform(32, color_jitter=0.4)
    first = transform(image, generator=torch.Generator().manual_seed(5))
    again = transform(image, generator=torch.Generator().manual_seed(5))
    other = transform(image, generator=torch.Generator().manual_seed(6))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_random_crop_stays_inside_the_image_and_respects_scale():
    transform = build_train_transform(32, scale=(0.25, 0.5))
    generator = torch.Generator().manual_seed(0)
    for size in [(64, 48), (30, 200), (200, 30), (7, 7)]:
        for _ in range(20):
            left, top, right, bottom = transform.crop_box(size, generator)
            assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def test_horizontal_flip_always_and_never():
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 255
    image = Image.fromarray(pixels)
    kwargs = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    kept = build_train_transform(32, hflip=0.0, **kwargs)(image)
    flipped = build_train_transform(32, hflip=1.0, **kwargs)(image)
    assert torch.equal(flipped, kept.flip(-1))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: build_eval_transform(32, interpolation="nearest"), "interpolation must be one of"),
        (lambda: build_eval_transform(32, crop_pct=1.5), "crop_pct must be in"),
        (lambda: build_eval_transform(0), r"img_size must be in \[16, 4096\], got 0"),
        (lambda: build_eval_transform(32, in_chans=4), "in_chans must be one of (1, 3), got 4"),
        (lambda: build_eval_transform(32, mean=(0.5, 0.5)), "mean must be a list of 1 or 3 numbers"),
        (lambda: build_eval_transform(32, std=(0.0,)), "std must be positive"),
        (lambda: build_train_transform(32, scale=(0.5, 0.1)), "scale must be (min, max) with min <= max"),
        (lambda: build_train_transform(32, scale=(0.0, 1.0)), "scale must be in (0, 1], got 0"),
        (lambda: build_train_transform(32, ratio=(0.0, 1.0)), "ratio must be > 0, got 0"),
        (lambda: build_train_transform(32, hflip=2.0), r"hflip must be in \[0, 1\], got 2"),
        (lambda: build_train_transform(32, color_jitter=-1.0), r"color_jitter must be in \[0, 1\], got -1"),
    ],
)
def test_bad_settings_raise_one_clear_error(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()
