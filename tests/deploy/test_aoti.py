"""AOTInductor packages (.pt2): exported, checked and carrying the card; run by predict, eval and bench, and by
PyTorch alone. One package is compiled for the whole module (tens of seconds); the other tests reuse its bytes."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.deploy import aoti
from selecsls.deploy.backends import BACKENDS
from selecsls.deploy.export import TOLERANCES, ExportMismatchError, export_model
from selecsls.models.compare import relative_difference
from selecsls.models.files import CheckpointError
from selecsls.models.validation import InvalidInput
from sparse_models import tiny_spec, trained_like
from training_fixtures import CLASS_COLOURS, make_image_folder, write_image

SIDE = 32
pytestmark = pytest.mark.slow  # the module's one compile: tens of seconds


def tiny_classifier(seed: int = 0):
    """A narrow selecsls42b at 32x32 with three named classes: a compile of seconds, not minutes."""
    torch.manual_seed(seed)
    model = trained_like(selecsls.create_model(tiny_spec(), num_classes=len(CLASS_COLOURS)), seed)
    model.card = replace(model.card.with_image_size(SIDE, SIDE), label_names=tuple(CLASS_COLOURS))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, package, printed output, compile seconds): the checkpoint exported by the CLI."""
    folder = tmp_path_factory.mktemp("aoti")
    checkpoint, package = folder / "tiny.pt", folder / "tiny.pt2"
    selecsls.save(tiny_classifier(), checkpoint)
    image = write_image(folder / "photo.jpg", (200, 120, 40), seed=0, size=(50, 40))
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = main(["export", str(checkpoint), "--format", "aoti", "--output", str(package), "--images", str(image)])
    assert code == 0
    return checkpoint, package, printed.getvalue(), time.perf_counter() - started


def test_export_writes_a_checked_package(exported):
    _, package, printed, seconds = exported
    print(f"AOTInductor export of a tiny network at {SIDE}px: {seconds:.1f} s")
    assert printed.count(" ok") == 2 and "1 real image(s)" in printed and f"wrote {package}" in printed
    assert [path.name for path in package.parent.iterdir() if path.name.startswith(".")] == []  # no temp file left


def test_package_carries_the_card_and_matches_eager_within_1e_5(exported):
    checkpoint, package, _, _ = exported
    started = time.perf_counter()
    loaded = aoti.load_package(package)  # runs once on zeros: its first output
    assert time.perf_counter() - started < 2.0
    model = selecsls.load(checkpoint).eval()
    assert loaded.card.label_names == tuple(CLASS_COLOURS)
    assert loaded.card.preprocessing == model.card.preprocessing
    assert loaded.params == selecsls.count_params(model) and loaded.macs > 0
    assert list(loaded.parameters()) == [] and not loaded.training
    images = torch.randn(3, 3, SIDE, SIDE)  # a batch runs one image at a time
    with torch.no_grad():
        assert relative_difference(model(images), loaded(images)) <= TOLERANCES["aoti"] == 1e-5


def test_package_runs_with_pytorch_alone(exported, tmp_path):
    _, package, _, _ = exported
    code = (
        "import sys, torch\n"
        f"compiled = torch._inductor.aoti_load_package({str(package)!r})\n"
        f"print(tuple(compiled(torch.zeros(1, 3, {SIDE}, {SIDE})).shape), "
        "sorted(m for m in sys.modules if m.startswith('selecsls')))"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == f"(1, {len(CLASS_COLOURS)}) []"


def test_package_refuses_other_inputs_and_training(exported):
    loaded = aoti.load_package(exported[1])
    with pytest.raises(InvalidInput, match=r"compiled for float32 images of shape \(3, 32, 32\).*--img-size"):
        loaded(torch.zeros(1, 3, SIDE + 8, SIDE))
    with pytest.raises(InvalidInput, match="float32"):
        loaded(torch.zeros(1, 3, SIDE, SIDE, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="runs inference only; train .* the checkpoint it was exported from"):
        loaded.train()


def test_files_that_are_not_our_packages_are_one_clear_error(tmp_path, exported):
    other = tmp_path / "other.pt2"
    other.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match="other.pt2 is not an AOTInductor package"):
        aoti.load_package(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        aoti.load_package(tmp_path / "missing.pt2")
    metadata = {"AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": "riscv128", "AOTI_CPU_ISA": ""}
    with pytest.raises(CheckpointError, match="compiled for another machine .*riscv128.*export it again"):
        aoti._check_machine(metadata, "x.pt2")


def test_predict_and_eval_take_the_package(exported, tmp_path, capsys):
    checkpoint, package, _, _ = exported
    image = write_image(tmp_path / "dog.jpg", CLASS_COLOURS["dog"], seed=3)
    assert main(["predict", str(image), "--checkpoint", str(package), "--topk", "3"]) == 0
    printed = capsys.readouterr().out
    assert "backend: aoti" in printed and all(name in printed for name in CLASS_COLOURS)
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--backend", "eager", "--topk", "3"]) == 0
    ranked = [line.split()[1] for line in printed.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    eager = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert ranked == eager

    data = make_image_folder(tmp_path / "data", per_class=2)
    scores = []
    for model_file in (package, checkpoint):
        assert main(["eval", "--data", str(data), "--checkpoint", str(model_file), "--workers", "0", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert scores[0]["images"] == scores[1]["images"] == 6 and scores[0]["top1"] == scores[1]["top1"]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], rel=1e-4)


def test_bench_times_the_package_as_compiled(exported, monkeypatch):
    from selecsls.bench.runner import BenchSettings, run_benchmark

    checkpoint, package, _, _ = exported
    monkeypatch.setattr("selecsls.bench.runner.inference_memory_bytes", lambda models, *args: {})
    settings = BenchSettings(
        models=(str(package),),
        shapes=((1, SIDE, SIDE), (1, 64, 64)),
        backends=("eager", "fused"),
        warmup=0,
        repeats=2,
        memory_shapes=((1, SIDE, SIDE),),
    )
    result = run_benchmark(settings)
    status = {(r["height"], r["backend"]): (r["status"], r.get("reason", "")) for r in result["latency"]}
    assert status[(SIDE, "eager")] == ("ok", "")
    assert "runs as compiled" in status[(SIDE, "fused")][1]
    assert "compiled for (3, 32, 32)" in status[(64, "eager")][1]
    info = result["models"][str(package)]
    assert info["params"] == selecsls.count_params(selecsls.load(checkpoint)) and set(info["macs_per_image"]) == {"32"}


def test_a_mismatching_package_fails_and_writes_nothing(exported, tmp_path, monkeypatch):
    package_bytes = exported[1].read_bytes()
    monkeypatch.setattr(aoti, "compile_package", lambda model, example, cfg: package_bytes)
    other = tiny_classifier(seed=1)  # the same network with other weights: the package does not compute it
    with pytest.raises(ExportMismatchError, match="differs from PyTorch beyond 1e-05 relative.*was not written"):
        export_model(other, tmp_path / "other.pt2", "aoti")
    assert list(tmp_path.iterdir()) == []
    model = selecsls.load(exported[0]).eval()
    example = torch.randn(1, 3, SIDE, SIDE)
    run = BACKENDS["aoti"].build(model, example)  # the backend: compiled in memory (here: the same bytes), checked
    with torch.no_grad():
        assert relative_difference(model(example), run(example)) <= 1e-5
