"""Hand-made and hostile model files: the description is checked against a strict schema before anything
is built, pickled code is refused in torch's current wording, non-finite weights are refused."""

import json
import os
import re
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.models import loading
from selecsls.models.card import PAYLOAD_KEY, ModelCard
from selecsls.models.files import HASH_KEY, CheckpointError, read_file, to_payload
from selecsls.models.spec import MAX_CONV_PARAMS, SpecError
from selecsls.models.validation import InvalidInput, check_img_size
from sparse_models import hollow_entries, tiny_spec
from training_fixtures import make_image_folder, write_image


def _model(**kwargs):
    return selecsls.create_model(tiny_spec(), **{"num_classes": 3} | kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=1)


def _one_line_error(capsys, argv) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _save_with_description(path, model, edit):
    """Save ``model`` with its JSON description changed by ``edit(description)`` (in place), as a hand-made file
    (without the content hash selecsls.save adds, which the change would no longer match)."""
    payload = to_payload(model)
    del payload[HASH_KEY]
    description = json.loads(payload[PAYLOAD_KEY])
    edit(description)
    torch.save({**payload, PAYLOAD_KEY: json.dumps(description)}, path)
    return path


def test_build_args_cannot_smuggle_create_model_arguments(tmp_path):
    other = tmp_path / "other.pt"
    selecsls.save(_model(), other)
    path = _save_with_description(
        tmp_path / "m.pt", _model(), lambda d: d["build_args"].update(checkpoint_path=str(other))
    )
    with pytest.raises(CheckpointError, match="build_args has unknown key.*checkpoint_path"):
        selecsls.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["build_args"].update(num_classes="3"), "num_classes must be an integer"),
        (lambda d: d["build_args"].update(fused=1), "fused must be true or false"),
        (lambda d: d["build_args"].update(drop_rate=float("nan")), "drop_rate must be a finite number"),
        (lambda d: d["build_args"].update(output_stride=4), "output_stride must be one of"),
        (lambda d: d.update(features_only="no"), "features_only must be true or false"),
        (lambda d: d.update(extra=1), "unknown key.*extra"),
        (lambda d: d["spec"].update(stem_chs=16.0), "stem_chs must be an integer"),
        (lambda d: d["spec"]["blocks"][0].update(first=1), "first must be true or false"),
        (lambda d: d["spec"]["blocks"][0].update(colour="red"), "unknown field.*colour"),
        (lambda d: d["pretrained_cfg"].update(crop_pct=0), r"crop_pct must be in \[0.25, 1\]"),
        (lambda d: d["pretrained_cfg"].update(crop_pct=0.001), r"crop_pct must be in \[0.25, 1\], got 0.001"),
        (lambda d: d["pretrained_cfg"].update(std=[1, 0, 1]), "std must be positive"),
        (lambda d: d["pretrained_cfg"].update(input_size=[3, 224]), "input_size must be a list of 3 integers"),
        (lambda d: d["pretrained_cfg"].update(label_names=["a", "b"]), "list of 3 class names"),
        (lambda d: d["pretrained_cfg"].update(loader="evil"), "unknown key.*loader"),
    ],
)
def test_description_schema_names_the_bad_field(tmp_path, edit, message):
    path = _save_with_description(tmp_path / "m.pt", _model(), edit)
    with pytest.raises(CheckpointError, match=message):
        selecsls.load(path)


@pytest.mark.parametrize("scale, message", [(1, "does not match its weights"), (4, "conv weights, more than")])
def test_a_spec_larger_than_its_weights_is_refused_before_allocating(tmp_path, monkeypatch, scale, message):
    """A 1 KB description declaring 2000- or 8000-wide layers must not make the loader allocate gigabytes."""
    spec = tiny_spec()
    wide = spec.with_widths({layer: 2000 for layer, *_ in spec.conv_layers()}, name="wide").to_dict()
    # Every width times ``scale``: still a consistent spec (input widths are sums of output widths).
    wide["stem_chs"] *= scale
    wide["head"] = [{**h, "out_chs": h["out_chs"] * scale} for h in wide["head"]]
    for block in wide["blocks"]:
        block.update(in_chs=block["in_chs"] * scale, skip_chs=block["skip_chs"] * scale)
        block["widths"] = [w * scale for w in block["widths"]]
    path = _save_with_description(tmp_path / "wide.pt", _model(), lambda d: d.update(spec=wide))
    assert path.stat().st_size < 2_000_000
    monkeypatch.setattr(loading, "build", lambda *a, **k: pytest.fail("built before checking"))
    with pytest.raises(CheckpointError, match=message):
        selecsls.load(path)


def test_a_spec_is_bounded_before_allocating():
    spec = tiny_spec()
    huge = spec.with_widths({f"features.{i}.conv6": 16384 for i in range(len(spec.blocks))})
    with pytest.raises(SpecError, match="conv weights, more than"):
        huge.with_widths({f"features.{i}.conv1": 16384 for i in range(len(spec.blocks))})
    assert huge.conv_params() <= MAX_CONV_PARAMS
    with pytest.raises(SpecError, match=r"width 16385; every width must be an integer in 1..16384"):
        spec.with_widths({"features.0.conv1": 16385})


def test_classifier_that_contradicts_the_description_is_refused(tmp_path):
    path = _save_with_description(tmp_path / "m.pt", _model(), lambda d: d["build_args"].update(num_classes=7))
    with pytest.raises(CheckpointError, match="declares 7 classes but its classifier fc.weight is"):
        selecsls.load(path)


def test_class_names_with_control_characters_are_kept_exactly_and_escaped_when_printed(tmp_path, capsys):
    """They must match the folder names they came from; only what prints them escapes them (predict's tests)."""
    names = ["cat\x1b[2J", "dog\nfox", "ok"]
    path = _save_with_description(tmp_path / "m.pt", _model(), lambda d: d["pretrained_cfg"].update(label_names=names))
    loaded = selecsls.load(path)
    assert loaded.pretrained_cfg["label_names"] == tuple(names)


def test_a_model_must_be_saveable_only_if_it_loads(tmp_path):
    """Its description is a card, checked by the schema files are: it cannot hold what would not load back."""
    model = _model()
    with pytest.raises(AttributeError, match="pretrained_cfg"):
        model.pretrained_cfg = {**model.pretrained_cfg, "loader": "x"}
    with pytest.raises(InvalidInput, match=r"crop_pct must be in \[0.25, 1\]"):
        replace(model.card.preprocessing, crop_pct=0)
    with pytest.raises(InvalidInput, match="list of 3 class names"):
        replace(model.card, label_names=("a", "b"))
    with pytest.raises(InvalidInput, match="unknown key.*loader"):
        ModelCard.from_pretrained_cfg({**model.pretrained_cfg, "loader": "x"}, model.spec, num_classes=3)
    selecsls.save(model, tmp_path / "m.pt")
    assert selecsls.load(tmp_path / "m.pt").card == model.card


class _RunsCode:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function, shown", [(os.system, os.system.__module__ + ".system"), (print, "print")])
def test_pickled_code_is_refused_in_torchs_current_wording(tmp_path, function, shown):
    """torch words the refusal two ways (blocked module / not allowlisted); if its wording drifts, the
    package's message falls back to 'not a readable PyTorch checkpoint' and this test fails."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _RunsCode(function, "echo pwned")}, path)
    with pytest.raises(CheckpointError) as caught:
        read_file(path)
    message = str(caught.value)
    assert f"stores pickled Python objects ({shown})" in message
    assert "weights_only=False" in message and "\n" not in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_every_loader(tmp_path, capsys, bad):
    model = _model()
    with torch.no_grad():
        model.fc.weight[0, 0] = bad
    path = tmp_path / "diverged.pt"
    torch.save(to_payload(model), path)
    with pytest.raises(CheckpointError, match=r"non-finite weights \(NaN or infinity in fc.weight\)"):
        selecsls.load(path)
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "non-finite weights" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("model weights, honest\n"), "not a readable PyTorch checkpoint"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
)
def test_things_that_are_not_checkpoints_give_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "model.pt"
    make(path)
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_onnx_file_gives_one_line(tmp_path, capsys):
    image = tmp_path / "a.png"
    write_image(image, (10, 20, 30), seed=0)
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    assert main(["predict", str(image), "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a readable ONNX file" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- issue 19, part B
@pytest.mark.parametrize("stored", ["zero-stride", "shared"])
def test_a_small_file_cannot_make_the_loader_allocate_what_it_does_not_store(
    tmp_path, monkeypatch, capsys, data, stored
):
    """A 90 KB file declaring a 14,000-wide head in zero-stride tensors passed the width and parameter limits
    and made eval allocate 14 GB. Every tensor must be backed by bytes the file holds, checked before building."""
    path = tmp_path / "m.pt"
    if stored == "zero-stride":
        torch.save(hollow_entries(tiny_spec().with_widths({"head.1": 14000, "head.2": 14000}, name="wide"), 3), path)
        assert path.stat().st_size < 200_000
        message = (
            r"stem.conv.weight has shape \(4, 3, 3, 3\) \(432 bytes\) but the file stores 4 bytes of it "
            r"\(a zero-stride or expanded tensor\); .* save them with tensor.contiguous\(\)"
        )
    else:  # every tensor a view of one stored block: together they need far more than it holds
        payload = to_payload(_model())
        del payload[HASH_KEY]
        state = payload["state_dict"]
        block = torch.zeros(max(tensor.numel() for tensor in state.values()))
        views = {k: block[: t.numel()].view(t.shape) if t.is_floating_point() else t for k, t in state.items()}
        torch.save({**payload, "state_dict": views}, path)
        message = r"its tensors need [\d,]+ bytes but the file stores [\d,]+ \(tensors share their data\)"
    monkeypatch.setattr(loading, "build", lambda *a, **k: pytest.fail("built before checking"))
    with pytest.raises(CheckpointError, match=message):
        selecsls.load(path)
    err = _one_line_error(capsys, ["eval", "--data", data, "--checkpoint", path, "--workers", 0])
    assert re.search(message, err), err


@pytest.mark.parametrize("side", [1, 15, 4097, 16384])
def test_the_input_size_a_file_records_meets_the_limits_of_img_size(tmp_path, capsys, data, side):
    """input_size [3, 1, 1] was evaluated at 1 px, [3, 16384, 16384] ended in PIL's DecompressionBombError."""
    path = _save_with_description(
        tmp_path / "m.pt", _model(), lambda d: d["pretrained_cfg"].update(input_size=[3, side, side])
    )
    err = _one_line_error(capsys, ["eval", "--data", data, "--checkpoint", path, "--workers", 0])
    assert err.endswith(f"m.pt: input_size must be in [16, 4096], got {side}"), err
    with pytest.raises(InvalidInput):
        check_img_size(side)  # --img-size refuses it too


def test_a_sparse_tensor_is_one_line_saying_what_to_do(tmp_path, capsys, data):
    """It gave a 14 KB dump of torch's dispatcher."""
    payload = to_payload(_model())
    del payload[HASH_KEY]
    payload["state_dict"]["fc.weight"] = payload["state_dict"]["fc.weight"].to_sparse()
    torch.save(payload, tmp_path / "m.pt")
    err = _one_line_error(capsys, ["eval", "--data", data, "--checkpoint", tmp_path / "m.pt", "--workers", 0])
    assert err.endswith(
        "m.pt: fc.weight is a sparse_coo tensor, which selecsls does not load (only dense tensors); "
        "convert it with tensor.to_dense() and save the file again"
    ), err


def test_negative_running_variances_are_refused_naming_the_layer(tmp_path, capsys, data):
    """They made eval report "top-1 33.33% loss nan" with exit status 0."""
    model = _model()
    with torch.no_grad():
        model.features[2].conv3.bn.running_var[1] = -0.5
    torch.save(to_payload(model), tmp_path / "m.pt")
    err = _one_line_error(capsys, ["eval", "--data", data, "--checkpoint", tmp_path / "m.pt", "--workers", 0])
    assert err.endswith(
        "m.pt: BatchNorm features.2.conv3.bn has negative running variances (down to -0.5), which no training "
        "produces: the file is damaged or was edited; re-download it or save it again"
    ), err


@pytest.mark.parametrize("command", ["eval", "export", "prune"])
def test_weights_that_overflow_are_named_as_the_cause_by_every_command(tmp_path, capsys, data, command):
    """Finite weights of 3e38 overflow to NaN outputs: eval said "loss nan" (exit 0), export blamed the exporter
    ("max abs diff nan"), prune called the result exact."""
    model = _model()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 4:
                parameter.fill_(3e38)
    path, out = tmp_path / "m.pt", tmp_path / "out"
    torch.save(to_payload(model), path)
    argv = {
        "eval": ["eval", "--data", data, "--checkpoint", path, "--workers", 0],
        "export": ["export", path, "--format", "onnx", "--out", out],
        "prune": ["prune", path, "--out", out, "--img-size", 32, "--repeats", 1],
    }[command]
    err = _one_line_error(capsys, argv)
    assert "the model produces NaN or infinite outputs on " in err and "its weights overflow float32" in err, err
    assert not out.exists()
