"""The CIFAR-10 reference pipeline end to end: the ``smoke`` preset (every step of the ``gpu`` preset at a
toy size) on a small image folder made here, then again: everything up to date, nothing runs."""

import importlib.util
import json
from pathlib import Path

import pytest

from training_fixtures import make_image_folder

RUN = Path(__file__).resolve().parents[2] / "references" / "cifar10" / "run.py"

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")


def _entry_point():
    spec = importlib.util.spec_from_file_location("cifar10_reference_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_the_smoke_preset_runs_every_step_then_resumes_with_nothing_to_do(tmp_path, capsys):
    main = _entry_point()
    data = make_image_folder(tmp_path / "data", per_class=14)
    arguments = ["--data", str(data), "--out", str(tmp_path / "runs"), "--preset", "smoke"]
    arguments += ["--publish-to", str(tmp_path / "published")]
    assert main(arguments) == 0, capsys.readouterr().err
    out = tmp_path / "runs" / "smoke"
    pilots = json.loads((out / "pilots.json").read_text())
    assert set(pilots) == {"sparse selecsls42b", "resnet50"}
    assert (tmp_path / "published" / "examples" / "cifar10" / "selecsls42b-pruned.safetensors").exists()
    assert json.loads((out / "head-to-head" / "models.json").read_text())
    assert not list(out.rglob(".*.partial*"))

    capsys.readouterr()
    assert main(arguments) == 0
    assert "running" not in capsys.readouterr().out  # every step up to date

    report = tmp_path / "report.json"
    assert main([*arguments, "--report", str(report)]) == 0
    result = json.loads(report.read_text())
    rows = {(row["model"], row["recipe"]): row for row in result["fair_test"]["rows"]}
    assert {row["status"] for row in rows.values()} == {"measured"}
    for row in rows.values():
        assert 0 <= row["removable_channels"] <= row["channels"] and row["macs_after"] <= row["macs"]
        assert row["top1"] is not None and row["top1_after"] is not None
    # dense sources and one MAC target per family; the sparse resnet50 beside the exact-pruned selecsls42b
    assert len(result["head_to_head"]) == 2 + 2 and len(result["head_to_head_sparse"]) == 1 + 1 + 1
    assert all(row["top1"] is not None for row in result["head_to_head"] + result["head_to_head_sparse"])
    assert (tmp_path / "report" / "fair-test-removal.png").exists()
