"""One limit per quantity: every place that takes a value checks it with the same helper, so it accepts the same
range and refuses with the same message."""

import pytest

from selecsls.data.tensor_cache import CacheError, CacheGeometry
from selecsls.data.transforms import build_eval_transform, build_train_transform
from selecsls.models.card import ModelCard, Preprocessing
from selecsls.models.network import SelecSLS
from selecsls.models.validation import InvalidInput
from sparse_models import tiny_spec


def _message(build) -> str:
    with pytest.raises(InvalidInput) as info:
        build()
    return str(info.value)


@pytest.mark.parametrize(
    "name, bad, good",
    [("drop_rate", 1.0, 0.9995), ("num_classes", -1, 0), ("output_stride", 4, 16), ("global_pool", "sum", "max")],
)
def test_the_card_and_the_network_take_the_same_build_arguments(name, bad, good):
    spec = tiny_spec()
    card_error = _message(lambda: ModelCard(spec, **{name: bad}))
    assert card_error == _message(lambda: SelecSLS(spec, **{name: bad}))
    assert card_error.startswith(f"{name} must be ")
    ModelCard(spec, **{name: good})
    SelecSLS(spec, **{name: good})


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("crop_pct", 0.2, "crop_pct must be in [0.25, 1], got 0.2"),
        ("interpolation", "nearest", "interpolation must be one of ('bilinear', 'bicubic'), got 'nearest'"),
    ],
)
def test_a_model_file_the_eval_pipeline_and_the_tensor_cache_take_the_same_preprocessing(name, bad, message):
    assert _message(lambda: Preprocessing(**{name: bad})) == message
    assert _message(lambda: build_eval_transform(32, **{name: bad})) == message
    with pytest.raises(CacheError) as info:
        CacheGeometry(32, **{name: bad})
    assert str(info.value) == f"cache {message}"


def test_a_model_file_and_the_image_pipelines_take_the_same_normalisation():
    message = "std must be positive, got (1.0, 0.0, 1.0)"
    assert _message(lambda: Preprocessing(std=(1, 0, 1))) == message
    assert _message(lambda: build_eval_transform(32, std=(1, 0, 1))) == message
    assert _message(lambda: build_train_transform(32, mean=(0.5, 0.5))) == _message(
        lambda: Preprocessing(mean=(0.5, 0.5))
    )


def test_the_cache_and_the_pipelines_take_the_same_image_sizes():
    with pytest.raises(CacheError, match=r"cache image size must be in \[16, 4096\], got 8"):
        CacheGeometry(8)
    assert _message(lambda: build_train_transform(8)) == "img_size must be in [16, 4096], got 8"
