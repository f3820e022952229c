"""Out-of-range numbers on every command: one line naming the option and its range, exit 2, before any
work (no silent fallback to a default, no attempt to allocate for a 100000-pixel image)."""

import re
import subprocess
import sys

import pytest

import selecsls
from selecsls.cli import BROKEN_PIPE, main
from selecsls.models.validation import check_img_size, check_number, estimated_activation_bytes
from sparse_models import sparse_tiny_model
from training_fixtures import make_image_folder, write_image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    selecsls.save(sparse_tiny_model(), root / "m.pt")
    make_image_folder(root / "data", per_class=1)
    write_image(root / "a.png", (1, 2, 3), seed=0)
    return root


COMMANDS = {
    "eval": lambda f: ["eval", "--data", str(f / "data"), "--checkpoint", str(f / "m.pt"), "--workers", "0"],
    "export": lambda f: ["export", str(f / "m.pt"), "--format", "onnx", "--out", str(f / "out.onnx")],
    "prune": lambda f: ["prune", str(f / "m.pt"), "--out", str(f / "out.pt")],
    "predict": lambda f: ["predict", str(f / "a.png"), "--checkpoint", str(f / "m.pt")],
    "bench": lambda f: ["bench", "--models", "selecsls42b", "--output", str(f / "bench")],
    "models": lambda f: ["models"],
    "train": lambda f: (
        ["train", "--data", str(f / "data"), "--output", str(f / "run"), "--init", str(f / "m.pt")]
        + ["--img-size", "32", "--batch-size", "1", "--workers", "0", "--no-progress", "--epochs", "10"]
    ),
}


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("eval", ["--crop-pct", "0"], r"--crop-pct must be in \[0.25, 1\], got 0"),
        ("eval", ["--crop-pct", "1.5"], r"--crop-pct must be in \[0.25, 1\], got 1.5"),
        ("eval", ["--img-size", "0"], "--img-size must be >= 16, got 0"),
        ("eval", ["--img-size", "100000"], "--img-size 100000 at batch 64 needs about .* GiB"),
        ("eval", ["--limit", "0"], "--limit must be >= 1, got 0"),
        ("eval", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("export", ["--img-size", "0"], "--img-size must be >= 16, got 0"),
        ("export", ["--img-size", "100000"], "--img-size 100000 at batch 1 needs about"),
        ("export", ["--prune", "nan"], "--prune must be a finite number"),
        ("export", ["--max-drop", "-1"], "--max-drop must be >= 0"),
        ("prune", ["--threshold", "inf"], "--threshold must be a finite number"),
        ("prune", ["--img-size", "100000"], "--img-size 100000 at batch 1 needs about"),
        ("predict", ["--topk", "0"], "topk must be >= 1, got 0"),
        ("bench", ["--sizes", "100000"], "image size 100000 at batch 1 needs about"),
        ("bench", ["--sizes", "8"], "image size must be >= 16, got 8"),
        ("models", ["--img-size", "-5"], "--img-size must be >= 16, got -5"),
        ("train", ["--seed", str(10**23)], rf"--seed must be in \[0, 4294967295\], got {10**23}"),
        ("train", ["--seed", "-1"], r"--seed must be in \[0, 4294967295\], got -1"),
        ("train", ["--warmup-epochs", "1e9"], r"--warmup-epochs must be in \[0, 5\] \(at most half of --epochs 10"),
        ("train", ["--color-jitter", "1e9"], r"--color-jitter must be in \[0, 1\], got 1e\+09"),
        ("train", ["--in-chans", "5"], r"--in-chans must be one of \(1, 3\), got 5"),
        ("train", ["--img-size", "224", "--batch-size", "100000"], r"at batch 100000 .* use --batch-size \d+ or less"),
        ("eval", ["--img-size", "224", "--batch-size", "100000"], r"at batch 100000 .* use --batch-size \d+ or less"),
    ],
)
def test_out_of_range_numbers_give_one_line(files, capsys, command, extra, message):
    assert main([*COMMANDS[command](files), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"selecsls {command}: error: ")
    assert re.search(message, err), err
    assert not (files / "out.onnx").exists() and not (files / "out.pt").exists() and not (files / "run").exists()


def test_the_memory_estimate_refuses_before_allocating():
    assert estimated_activation_bytes(100_000) > 10**12
    assert check_img_size(224, batch=64) == 224
    with pytest.raises(ValueError, match="--img-size 100000 at batch 1 needs about 1,863 GiB"):
        check_img_size(100_000)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "1"])
def test_numbers_must_be_finite_numbers(value):
    with pytest.raises(ValueError, match="must be a finite number"):
        check_number("--x", value)


def test_output_piped_into_a_reader_that_went_away_ends_quietly():
    """`selecsls info selecsls60 | head -0`: the pipe is closed when the command writes; no error line, status 141."""
    command = [sys.executable, "-m", "selecsls", "info", "selecsls60"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # the reader is gone before the command's first write
        err = process.stderr.read().decode()
        assert process.wait(timeout=120) == BROKEN_PIPE, err
    assert "Broken pipe" not in err and "Traceback" not in err, err
