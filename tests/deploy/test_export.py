"""ONNX export (torch.export-based): round trips within tolerance (dense and pruned), checks that fail loudly.
AOTInductor packages are tested in test_aoti.py, OpenVINO IRs in test_openvino.py."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.deploy.export import (
    ONNX_OPSET,
    RELATIVE_TOLERANCE,
    ExportMismatchError,
    export_model,
    read_metadata,
)
from sparse_models import sparse_tiny_model
from training_fixtures import write_image

SIZE = (3, 64, 64)


def small(model):
    """Export and check at 64x64 (the model's recorded input size) to keep the tests fast."""
    model.card = model.card.with_image_size(*SIZE[1:])
    return model.eval()


@pytest.fixture
def dense():
    return small(sparse_tiny_model(fraction=0.0))


@pytest.fixture
def pruned_checkpoint(tmp_path):
    """A model with 30% inactive channels, pruned and saved the way `selecsls prune` saves it."""
    dense = small(sparse_tiny_model(fraction=0.3))
    pruned = selecsls.prune(dense, 1e-3)
    assert selecsls.count_params(pruned) < selecsls.count_params(dense)
    path = tmp_path / "pruned.pt"
    selecsls.save(pruned, path)
    return dense, path


@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_round_trip(dense, tmp_path, dynamic):
    path = tmp_path / "model.onnx"
    images = torch.randn(3, *SIZE)
    checks = export_model(dense, path, "onnx", dynamic=dynamic, images=images)
    assert all(check.relative_diff <= RELATIVE_TOLERANCE for check in checks)
    assert [c.inputs for c in checks][-1] == "3 real image(s)"
    proto = onnx.load(path)
    assert proto.opset_import[0].version == ONNX_OPSET >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == ([True, False, True, True] if dynamic else [False] * 4)
    assert read_metadata(path)["input_size"] == list(SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2 if dynamic else 1, 3, 96 if dynamic else 64, 64)
    with torch.no_grad():
        expected = dense(x)
    actual = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(actual, expected, rtol=0, atol=RELATIVE_TOLERANCE * float(expected.abs().max()))


def test_pruned_checkpoint_exports_and_matches_the_dense_model(pruned_checkpoint, tmp_path):
    dense, path = pruned_checkpoint
    out = tmp_path / "pruned.onnx"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        expected = dense(x)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    actual = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(actual, expected, rtol=0, atol=RELATIVE_TOLERANCE * float(expected.abs().max()))


def test_cli_prunes_and_checks_on_real_images(dense, tmp_path, capsys):
    checkpoint = tmp_path / "dense.pt"
    selecsls.save(dense, checkpoint)
    image = write_image(tmp_path / "photo.jpg", (200, 120, 40), seed=0, size=(90, 70))
    out = tmp_path / "model.onnx"
    args = [
        "export",
        str(checkpoint),
        "--format",
        "onnx",
        "--out",
        str(out),
        "--prune",
        "1e-3",
        "--dynamic",
        "--images",
        str(image),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pruned at fused filter norm < 0.001" in printed
    assert "1 real image(s): max abs diff" in printed and printed.count(" ok") == 3
    assert out.is_file()


def test_a_mismatching_export_fails_and_writes_nothing(dense, tmp_path, monkeypatch):
    import selecsls.deploy.export as export

    exact = export.session_runner
    monkeypatch.setattr(export, "session_runner", lambda session: lambda x: exact(session)(x) + 1e-2)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportMismatchError, match="differs from PyTorch beyond 0.0001 relative.*was not written"):
        export_model(dense, path, "onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "openvino"], "--format openvino writes NAME.xml and NAME.bin: give --output ending in .xml"),
        (["--format", "onnx", "--int8"], "--int8 needs --calibration DATA"),
        (["--format", "aoti", "--dynamic"], "--dynamic applies to ONNX and OpenVINO"),
        (["--format", "aoti", "--int8", "--calibration", "data"], "--int8 produces an ONNX model or an OpenVINO IR"),
        (["--format", "aoti"], "--format aoti writes a .pt2 package: give --output ending in .pt2"),
        (["--format", "onnx", "--images", "missing.jpg"], "image missing.jpg does not exist"),
    ],
)
def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys, extra, message):
    assert main(["export", "model.pt", "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_torchscript_export_is_named_as_dropped(capsys):
    with pytest.raises(SystemExit):
        main(["export", "model.pt", "--out", "x.pt", "--format", "torchscript"])
    err = capsys.readouterr().err
    assert "TorchScript export was dropped" in err and "use --format aoti" in err


def test_cli_reports_a_checkpoint_model_mismatch(tmp_path, capsys):
    checkpoint = tmp_path / "weights.pth"
    torch.save(selecsls.create_model("selecsls42b").state_dict(), checkpoint)
    args = ["export", str(checkpoint), "--model", "selecsls60", "--format", "onnx", "--out", str(tmp_path / "x.onnx")]
    assert main(args) == 2
    assert "does not fit selecsls60" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
