"""predict with bad files among good ones: the good ones are predicted, the bad ones reported, exit 2 at
the end; names a hand-made file carries reach the terminal without control characters, and every other
name exactly; a model without class scores is refused in one line by every command that needs them."""

import json
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.deploy.inference import Predictor
from selecsls.models.card import PAYLOAD_KEY
from selecsls.models.files import HASH_KEY, to_payload
from sparse_models import sparse_tiny_model, tiny_spec
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


# ------------------------------------------------------------------------------- issue 19, part A
#: Folder names with a non-breaking space and a zero-width non-joiner (Persian "I want"): printable, not ASCII.
UNICODE_NAMES = ("Ankle\u00a0boot", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "x")


def test_class_names_are_stored_and_printed_exactly(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for i, name in enumerate(UNICODE_NAMES):
            write_image(data / split / name / "0.png", (200, 30, 30), seed=i)
    model = sparse_tiny_model(num_classes=3)
    model.card = replace(model.card.with_image_size(32, 32), label_names=UNICODE_NAMES)  # as training records them
    selecsls.save(model, tmp_path / "m.pt")
    assert selecsls.load(tmp_path / "m.pt").card.label_names == UNICODE_NAMES
    assert main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "m.pt"), "--workers", "0"]) == 0
    assert f"3 classes matched by name: {', '.join(UNICODE_NAMES)}\n" in capsys.readouterr().out
    image = data / "val" / UNICODE_NAMES[0] / "0.png"
    assert main(["predict", str(image), "--checkpoint", str(tmp_path / "m.pt"), "--topk", "3"]) == 0
    printed = capsys.readouterr().out
    assert all(f". {name} " in printed for name in UNICODE_NAMES), printed


@pytest.mark.parametrize(
    "command, build, message",
    [
        (
            "eval",
            {"features_only": True},
            "scoring on labelled images needs class scores, but tiny42b is a features-only",
        ),
        ("eval", {"num_classes": 0}, "scoring on labelled images needs class scores, but tiny42b has no classifier"),
        ("predict", {"features_only": True}, "predict needs class scores, but tiny42b is a features-only backbone"),
        ("export", {"features_only": True}, "export needs one output tensor, but tiny42b is a features-only backbone"),
    ],
    ids=["eval features-only", "eval without classifier", "predict features-only", "export features-only"],
)
def test_a_model_without_class_scores_is_refused_clearly(tmp_path, capsys, command, build, message):
    path = tmp_path / "backbone.pt"
    selecsls.save(selecsls.create_model(tiny_spec(), **build), path)
    image = write_image(tmp_path / "data" / "val" / "cat" / "0.png", (200, 30, 30), seed=0)
    argv = {
        "eval": ["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(path), "--workers", "0"],
        "predict": ["predict", str(image), "--checkpoint", str(path)],
        "export": ["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--img-size", "32"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"selecsls {command}: error: {message}") and "fine-tune it into a classifier" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "m.onnx").exists()
