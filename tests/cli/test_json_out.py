"""``--json-out FILE``: eval's result and export's checks land in a file the package writes whole, so
scripts (the CIFAR-10 reference pipeline) read results from files, never from printed text."""

import json

import pytest

import selecsls
from selecsls.cli import main
from sparse_models import sparse_tiny_model
from training_fixtures import make_image_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("json_out")
    selecsls.save(sparse_tiny_model(num_classes=3), root / "m.pt")
    make_image_folder(root / "data", per_class=2)
    return root


def test_eval_writes_what_it_prints(files, capsys):
    command = ["eval", "--data", str(files / "data"), "--checkpoint", str(files / "m.pt"), "--workers", "0"]
    assert main([*command, "--json", "--json-out", str(files / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((files / "eval.json").read_text()) == printed
    assert printed["images"] == 6 and 0 <= printed["top1"] <= 100


def test_eval_refuses_to_write_over_its_input(files, capsys):
    command = ["eval", "--data", str(files / "data"), "--checkpoint", str(files / "m.pt"), "--workers", "0"]
    assert main([*command, "--json-out", str(files / "m.pt")]) == 2
    assert "is the input" in capsys.readouterr().err


def test_export_writes_its_checks(files):
    pytest.importorskip("onnxruntime")
    out = files / "m.onnx"
    assert (
        main(
            ["export", str(files / "m.pt"), "--format", "onnx", "--out", str(out), "--json-out", str(files / "e.json")]
        )
        == 0
    )
    result = json.loads((files / "e.json").read_text())
    assert result["int8"] is None and result["checks"]
    assert all(check["relative_diff"] <= check["tolerance"] for check in result["checks"])


def test_export_int8_writes_the_accuracy_it_measured(files):
    pytest.importorskip("onnxruntime")
    out, record = files / "m8.onnx", files / "int8.json"
    command = ["export", str(files / "m.pt"), "--format", "onnx", "--out", str(out), "--int8"]
    command += ["--calibration", str(files / "data"), "--eval-images", "6", "--json-out", str(record)]
    assert main(command) == 0
    comparison = json.loads(record.read_text())["int8"]
    assert comparison["images"] == 6 and 0 <= comparison["candidate_top1"] <= 100
    assert set(comparison) == {"images", "reference_top1", "candidate_top1", "agreement"}
