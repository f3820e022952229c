import re

import pytest
import torch

import selecsls
from selecsls.cli import main
from sparse_models import IMAGE, every_kind, relative_error, sparse_tiny_model, tiny_spec, trained_like

FAST = ["--img-size", "64", "--warmup", "0", "--repeats", "1"]


@pytest.fixture
def checkpoint(tmp_path):
    model = sparse_tiny_model(0.3)
    path = tmp_path / "dense.pt"
    selecsls.save(model, path)
    return model, path


def test_prune_prints_report_and_saves_an_equivalent_model(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    out, png = tmp_path / "pruned.pt", tmp_path / "gamma.png"
    assert main(["prune", str(path), "--out", str(out), "--histogram", str(png), *FAST]) == 0
    printed = capsys.readouterr().out
    pruned = selecsls.load(out).eval()
    total = next(line for line in printed.splitlines() if line.startswith("total")).split()
    assert int(total[1]) == sum(c for *_, c, _ in model.spec.conv_layers())
    assert int(total[-1]) == sum(c for *_, c, _ in pruned.spec.conv_layers())
    assert "features.5.conv6" in printed and "params " in printed and "GMACs@64" in printed
    assert "CPU latency @64" in printed and "fine-tune" not in printed
    assert png.read_bytes()[:4] == b"\x89PNG"
    x = torch.randn(IMAGE)
    with torch.no_grad():
        assert relative_error(model(x), pruned(x)) <= 1e-4


def test_budgeted_prune_says_to_fine_tune(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    out = tmp_path / "small.pt"
    assert main(["prune", str(path), "--out", str(out), "--target-macs", "0.3", *FAST]) == 0
    assert f"selecsls train --data DIR --init {out}" in capsys.readouterr().out
    size = (1, 3, 64, 64)
    fraction = selecsls.count_macs(selecsls.load(out), size) / selecsls.count_macs(model, size)
    assert fraction == pytest.approx(0.3, rel=0.02)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-macs", "1.5"], r"macs must be a fraction in \(0, 1\]"),
        (["--threshold", "-1"], "threshold must be >= 0"),
        (["--img-size", "0"], "--img-size must be >= 16, got 0"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_options_give_one_line_errors(checkpoint, tmp_path, capsys, extra, message):
    _, path = checkpoint
    assert main(["prune", str(path), "--out", str(tmp_path / "x.pt"), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not (tmp_path / "x.pt").exists()


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_one_budget_at_a_time(checkpoint, tmp_path):
    with pytest.raises(SystemExit):
        main(["prune", str(checkpoint[1]), "--out", "x.pt", "--target-macs", "0.5", "--target-params", "0.5"])


def test_prune_measures_at_the_size_the_model_records_and_takes_output(tmp_path, capsys):
    model = sparse_tiny_model(0.3)
    model.card = model.card.with_image_size(48, 80)  # height 48, width 80: measured as recorded, not at 224
    selecsls.save(model, tmp_path / "dense.pt")
    argv = ["prune", str(tmp_path / "dense.pt"), "--output", str(tmp_path / "pruned.pt"), "--repeats", "1"]
    assert main([*argv, "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "GMACs@80x48 " in printed and "CPU latency @80x48, batch 1" in printed
    assert selecsls.load(tmp_path / "pruned.pt").card.preprocessing.input_size == (3, 48, 80)


def test_pruning_its_own_output_removes_nothing(tmp_path, capsys):
    """Every kind of inactive channel goes in the first run (the table says why), so a second run finds none."""
    model = every_kind(trained_like(selecsls.create_model(tiny_spec(), num_classes=10)))
    selecsls.save(model, tmp_path / "m.pt")
    assert main(["prune", str(tmp_path / "m.pt"), "--out", str(tmp_path / "once.pt"), *FAST]) == 0
    first = capsys.readouterr().out
    assert "gamma~0" in first and "filter~0" in first and "const folded" in first and "unread" in first
    assert "exact pruning removes 0 of" not in first
    assert main(["prune", str(tmp_path / "once.pt"), "--out", str(tmp_path / "twice.pt"), *FAST]) == 0
    channels = sum(c for *_, c, _ in selecsls.load(tmp_path / "once.pt").spec.conv_layers())
    assert f"exact pruning removes 0 of {channels} channels" in capsys.readouterr().out
