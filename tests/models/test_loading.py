"""One way in: ``create_model(checkpoint_path=)`` and ``read_state_dict`` read a file through the loading
pipeline as ``selecsls.load`` does (identified, its hash verified, its card deciding the model)."""

import math
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls import create_model
from selecsls.models.files import HASH_KEY, CheckpointError, read_file, read_state_dict
from sparse_models import tiny_spec, trained_like

DAMAGED = "file is damaged: the weights or model description in .* no longer match the content hash"


@pytest.fixture
def saved(tmp_path):
    """A model the package saved, its image size and class names in its card."""
    model = trained_like(create_model(tiny_spec(), num_classes=3))
    model.card = replace(model.card.with_image_size(64, 64), label_names=("cat", "dog", "owl"))
    selecsls.save(model, tmp_path / "model.pt")
    return model, tmp_path / "model.pt"


@pytest.fixture
def damaged(saved, tmp_path):
    """The saved file with one weight changed after its content hash was written (a flipped bit, in effect)."""
    payload = read_file(saved[1])
    assert HASH_KEY in payload
    payload["state_dict"]["fc.bias"][0] += 1.0
    torch.save(payload, tmp_path / "damaged.pt")
    return tmp_path / "damaged.pt"


def test_a_damaged_file_is_refused_through_create_model(damaged):
    with pytest.raises(CheckpointError, match=DAMAGED):
        create_model(tiny_spec(), num_classes=3, checkpoint_path=damaged)


def test_a_damaged_file_is_refused_through_read_state_dict(damaged):
    with pytest.raises(CheckpointError, match=DAMAGED):
        read_state_dict(damaged)
    with pytest.raises(CheckpointError, match=DAMAGED):
        read_state_dict(read_file(damaged))


def test_read_state_dict_refuses_non_finite_weights_and_keeps_the_layout_filter(saved, tmp_path):
    state = {f"module.{key}": tensor for key, tensor in saved[0].state_dict().items()}  # DDP's prefix
    assert read_state_dict(state).keys() == saved[0].state_dict().keys()
    state["module.fc.bias"] = torch.full_like(state["module.fc.bias"], math.nan)
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="nan.pt.*fc.bias"):
        read_state_dict(tmp_path / "nan.pt")


def test_create_model_keeps_the_files_card_as_load_does(saved):
    model, path = saved
    created = create_model(tiny_spec(), num_classes=3, checkpoint_path=path)
    assert created.card == selecsls.load(path).card == model.card  # preprocessing, class names
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(created.eval()(x), model.eval()(x))


def test_create_model_without_options_builds_what_the_file_holds(saved, tmp_path):
    """Options left unset are not overrides: the saved 3-class model (and a plain 3-class state dict)
    load with their own classifier, not a fresh 1000-class one."""
    model, path = saved
    torch.save(model.state_dict(), tmp_path / "state_dict.pt")
    x = torch.randn(2, 3, 64, 64)
    for file in (path, tmp_path / "state_dict.pt"):
        created = create_model(tiny_spec(), checkpoint_path=file).eval()
        assert created.num_classes == 3
        with torch.no_grad():
            torch.testing.assert_close(created(x), model.eval()(x))
    assert create_model(tiny_spec()).num_classes == 1000  # a new model takes the default


def test_create_model_refuses_a_file_of_another_architecture(saved):
    with pytest.raises(CheckpointError, match=r"model.pt holds a tiny42b model \(its saved description\), not "):
        create_model("selecsls60", num_classes=3, checkpoint_path=saved[1])
    with pytest.raises(ValueError, match="cannot override in_chans when loading a saved model"):
        create_model(tiny_spec(), num_classes=3, in_chans=1, checkpoint_path=saved[1])
