"""predict with bad files among good ones: the good ones are predicted, the bad ones reported, exit 2 at
the end; names a hand-made file carries reach the terminal without control characters."""

import json

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.deploy.inference import Predictor
from selecsls.models.card import PAYLOAD_KEY
from selecsls.models.files import HASH_KEY, to_payload
from sparse_models import sparse_tiny_model
from training_fixtures import corrupt_image, write_image


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = sparse_tiny_model(num_classes=3)
    model.card = model.card.with_image_size(32, 32)
    payload = to_payload(model)
    del payload[HASH_KEY]  # a hand-made file
    description = json.loads(payload[PAYLOAD_KEY])
    description["pretrained_cfg"]["label_names"] = ["cat\x1b]0;pwned\x07", "dog", "fox"]
    path = tmp_path_factory.mktemp("predict") / "m.pt"
    torch.save({**payload, PAYLOAD_KEY: json.dumps(description)}, path)
    return path


def test_one_unreadable_image_does_not_stop_the_others(model_file, tmp_path, capsys):
    good = [write_image(tmp_path / f"{name}.png", (200, 30, 30), seed=i) for i, name in enumerate("ac")]
    bad = corrupt_image(write_image(tmp_path / "bad.jpg", (1, 2, 3), seed=5))
    missing = tmp_path / "missing.jpg"
    paths = [good[0], bad, missing, good[1]]
    assert main(["predict", *map(str, paths), "--checkpoint", str(model_file), "--topk", "2"]) == 2
    captured = capsys.readouterr()
    for path in good:
        assert f"{path}\n  1. " in captured.out
    assert f"{bad}\n  unreadable: " in captured.out and f"{missing}\n  unreadable: " in captured.out
    assert captured.err.strip() == f"selecsls predict: error: 2 of 4 image(s) could not be read: {bad}, {missing}"
    assert "\x1b" not in captured.out and "\x07" not in captured.out


def test_the_api_returns_every_image_in_order(model_file, tmp_path):
    good = write_image(tmp_path / "a.png", (200, 30, 30), seed=0)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    predictions = Predictor.from_model(selecsls.load(model_file), "fused_channels_last").predict([bad, good, bad])
    assert [p.error is None for p in predictions] == [False, True, False]
    assert predictions[1].classes and not predictions[0].classes


def test_no_readable_image_fails_before_loading_the_model(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "none.jpg"), "--checkpoint", str(tmp_path / "no-model.pt")]) == 2
    assert "image " + str(tmp_path / "none.jpg") + " does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 19, part B
@pytest.mark.parametrize("backend", ["auto", "fused_channels_last"])
def test_weights_that_overflow_give_an_error_naming_the_cause_not_nan_percent(tmp_path, capsys, backend):
    model = sparse_tiny_model(num_classes=3)
    model.card = model.card.with_image_size(32, 32)
    with torch.no_grad():
        model.fc.weight.fill_(3e38)  # finite, but the logits overflow
    path = tmp_path / "m.pt"
    torch.save(to_payload(model), path)
    image = write_image(tmp_path / "a.png", (200, 30, 30), seed=0)
    assert main(["predict", str(image), "--checkpoint", str(path), "--backend", backend]) == 2
    captured = capsys.readouterr()
    assert "nan" not in captured.out and len(captured.err.strip().splitlines()) == 1
    assert "the model produces NaN or infinite outputs on " in captured.err
    assert "its weights overflow float32 arithmetic" in captured.err
