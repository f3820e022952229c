"""OpenVINO: the backend and the IR export reproduce PyTorch (random and real images), the IR carries the
preprocessing for ``selecsls predict``, files land both or neither, and a missing runtime is a skip reason."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls.bench.runner import BenchSettings, run_benchmark
from selecsls.cli import main
from selecsls.data.transforms import eval_transform_for
from selecsls.deploy import openvino_ir
from selecsls.deploy.backends import BACKENDS, BackendUnavailable
from selecsls.deploy.export import RELATIVE_TOLERANCE, ExportMismatchError, export_model, read_metadata
from selecsls.deploy.inference import Predictor, load_images
from sparse_models import sparse_tiny_model

pytest.importorskip("openvino")
SIZE = (3, 64, 64)


@pytest.fixture(scope="module")
def model():
    model = sparse_tiny_model(fraction=0.0)
    model.card = replace(model.card.with_image_size(*SIZE[1:]), label_names=[f"c{i}" for i in range(10)])
    return model.eval()


@pytest.fixture(scope="module")
def photo():
    """A real photograph (shipped with matplotlib), preprocessed like any input."""
    cbook = pytest.importorskip("matplotlib.cbook")
    return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


def relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_openvino_backend_equals_pytorch_on_random_and_real_images(model, photo):
    real = load_images([photo], eval_transform_for(model.card.preprocessing))
    random = torch.randn(1, *SIZE)
    run = BACKENDS["openvino"].build(model, random)
    with torch.no_grad():
        for inputs in (random, real):
            assert relative_diff(run(inputs), model(inputs)) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("dynamic", [False, True])
def test_ir_export_is_checked_on_real_images_and_predicts_like_pytorch(model, photo, tmp_path, dynamic):
    xml = tmp_path / "model.xml"
    real = load_images([photo, photo], eval_transform_for(model.card.preprocessing))
    checks = export_model(model, xml, "openvino", dynamic=dynamic, images=real)
    assert [check.inputs for check in checks][-1] == "2 real image(s)" and all(check.passed for check in checks)
    assert len(checks) == (3 if dynamic else 2)  # a second batch and size when the IR accepts any shape
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.bin", "model.xml"]
    assert read_metadata(xml)["input_size"] == list(SIZE)
    # weights stay fp32: over 3 bytes per parameter (OpenVINO's default would store fp16, 2 bytes; the
    # BatchNorms are folded into the convs, so slightly under 4)
    assert xml.with_suffix(".bin").stat().st_size > 3 * selecsls.count_params(model)

    predictor = Predictor.from_exported(xml)
    expected = Predictor.from_model(model, "eager").predict([photo, photo], topk=3)
    assert predictor.backend == "openvino" and predictor.names[:2] == ["c0", "c1"]
    for got, want in zip(predictor.predict([photo, photo], topk=3), expected):
        assert [name for name, _ in got.classes] == [name for name, _ in want.classes]
        assert [p for _, p in got.classes] == pytest.approx([p for _, p in want.classes], abs=1e-5)


def test_a_mismatching_ir_fails_and_writes_neither_file(model, tmp_path, monkeypatch):
    exact = openvino_ir.compiled_runner
    monkeypatch.setattr(openvino_ir, "compiled_runner", lambda ir: lambda x: exact(ir)(x) + 1e-2)
    with pytest.raises(ExportMismatchError, match="differs from PyTorch beyond 0.0001 relative.*was not written"):
        export_model(model, tmp_path / "model.xml", "openvino")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_an_ir_and_predicts_from_it(model, photo, tmp_path, capsys):
    checkpoint = tmp_path / "model.pt"
    selecsls.save(model, checkpoint)
    xml = tmp_path / "ir" / "model.xml"
    assert main(["export", str(checkpoint), "--format", "openvino", "--out", str(xml), "--images", photo]) == 0
    printed = capsys.readouterr().out
    assert "1 real image(s): max abs diff" in printed and f"wrote {xml} and {xml.with_suffix('.bin')}" in printed
    assert main(["predict", photo, "--checkpoint", str(xml), "--topk", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "backend: openvino" and lines[2].split()[0] == "1."
    assert main(["predict", photo, "--checkpoint", str(xml), "--backend", "eager"]) == 2
    assert "runs on openvino only; drop --backend eager" in capsys.readouterr().err


def test_reading_an_ir_without_its_weights_names_the_missing_file(model, tmp_path):
    xml = tmp_path / "model.xml"
    export_model(model, xml, "openvino")
    xml.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.bin'\] do not exist"):
        read_metadata(xml)


def test_a_missing_openvino_is_a_skip_reason_not_an_import_error(model, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "model.pt"
    selecsls.save(model, checkpoint)
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    assert main(["export", str(checkpoint), "--format", "openvino", "--out", str(tmp_path / "m.xml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selecsls export: error: openvino is needed") and "\n" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt"]
    for name in ("openvino", "openvino_int8"):
        with pytest.raises(BackendUnavailable, match=r"openvino is needed .*pip install 'selecsls\[openvino\]'"):
            BACKENDS[name].build(model, torch.randn(1, *SIZE))
    monkeypatch.setattr("selecsls.bench.runner.inference_memory_bytes", lambda models, shapes, threads: {})
    settings = BenchSettings(
        models=("selecsls42b",), shapes=((1, 32, 32),), backends=("openvino",), warmup=0, repeats=1
    )
    (record,) = run_benchmark(settings)["latency"]
    assert record["status"] == "skipped" and "pip install 'selecsls[openvino]'" in record["reason"]


def test_openvino_int8_backend_runs_with_int8_weights(model):
    example = torch.randn(1, *SIZE)
    run = BACKENDS["openvino_int8"].build(model, example)
    with torch.no_grad():
        expected = model(example)
    logits = run(example)
    assert logits.shape == expected.shape and torch.isfinite(logits).all()
    assert BACKENDS["openvino_int8"].precision == "int8" and not BACKENDS["openvino_int8"].exact
