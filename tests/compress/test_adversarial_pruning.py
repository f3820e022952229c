"""Pruning that would change the outputs: measured, reported, refused above 1e-4 unless accepted explicitly."""

import re

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.compress.pruning import OUTPUT_TOLERANCE, OutputChangeError, prune, prune_to_budget
from sparse_models import IMAGE, relative_error, sparse_tiny_model


@pytest.fixture
def model():
    return sparse_tiny_model(0.3)


def test_exact_pruning_records_a_negligible_change(model):
    pruned = prune(model, 1e-3)
    assert pruned.output_change < 1e-5
    x = torch.randn(IMAGE)
    with torch.no_grad():
        assert relative_error(model(x), pruned(x)) < OUTPUT_TOLERANCE


@pytest.mark.parametrize("threshold", [0.999, 1e30])
def test_a_threshold_that_cuts_live_channels_is_refused(model, threshold):
    with pytest.raises(OutputChangeError, match=re.escape(f"threshold {threshold:g} changes the outputs by")):
        prune(model, threshold)
    accepted = prune(model, threshold, max_output_change=None)
    x = torch.randn(IMAGE)
    with torch.no_grad():
        measured = relative_error(model(x), accepted(x))
    assert accepted.output_change > OUTPUT_TOLERANCE and measured > OUTPUT_TOLERANCE


def test_the_change_is_measured_on_calibration_images_when_given(model):
    images = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pruned = prune(model, 0.999, images, max_output_change=None)
    with torch.no_grad():
        expected = max(relative_error(model.eval()(x), pruned.eval()(x)) for x in images)
    assert pruned.output_change == pytest.approx(expected, rel=1e-5)


def test_budgeted_pruning_records_its_change(model):
    assert prune_to_budget(model, macs=0.2).output_change > OUTPUT_TOLERANCE


def test_the_cli_refuses_and_writes_nothing_unless_told(model, tmp_path, capsys):
    selecsls.save(model, tmp_path / "m.pt")
    args = ["prune", str(tmp_path / "m.pt"), "--out", str(tmp_path / "p.pt"), "--threshold", "0.999"]
    fast = ["--img-size", "32", "--warmup", "0", "--repeats", "1"]
    assert main([*args, *fast]) == 2
    assert "--allow-output-change" in capsys.readouterr().err and not (tmp_path / "p.pt").exists()
    assert main([*args, *fast, "--allow-output-change"]) == 0
    assert "CHANGED: fine-tune next" in capsys.readouterr().out and (tmp_path / "p.pt").exists()
    assert (
        main(
            ["export", str(tmp_path / "m.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
            + ["--prune", "0.999"]
        )
        == 2
    )
    assert "changes the outputs" in capsys.readouterr().err


def test_a_budget_met_without_changing_the_outputs_says_so(model, tmp_path, capsys):
    """--target-params 1 prunes only the free channels: the outputs are unchanged, no fine-tuning is due."""
    selecsls.save(model, tmp_path / "m.pt")
    args = ["prune", str(tmp_path / "m.pt"), "--out", str(tmp_path / "p.pt"), "--target-params", "1"]
    assert main([*args, "--img-size", "32", "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "(exact; tolerance" in out and "fine-tune" not in out
    assert out.rstrip().endswith("without changing the outputs (within the tolerance): no fine-tuning needed")
