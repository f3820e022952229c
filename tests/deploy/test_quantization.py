"""int8 post-training quantization (ONNX Runtime, OpenVINO/NNCF): the model runs and keeps its accuracy on real
Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import selecsls
from selecsls.data.batching import TransformedDataset, build_loader
from selecsls.data.datasets import build_dataset
from selecsls.data.transforms import build_eval_transform
from selecsls.deploy import openvino_ir
from selecsls.deploy.export import onnx_session, session_runner
from selecsls.deploy.quantization import AccuracyComparison, compare_accuracy, export_int8
from training_fixtures import narrow_spec

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMG_SIZE, TRAIN_STEPS, BATCH = 32, 150, 32
#: Stated tolerance: int8 may lose at most this many top-1 points on the validation subset.
MAX_DROP = 3.0

pytestmark = pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST IDX files not installed")


def batches(split: str, count: int, batch_size: int = 100):
    transform = build_eval_transform(IMG_SIZE, crop_pct=1.0, mean=(0.286,), std=(0.353,), in_chans=1)
    dataset = TransformedDataset(build_dataset(FASHION_MNIST, split), transform)
    return list(build_loader(dataset, range(count), batch_size, workers=0))


@pytest.fixture(scope="module")
def trained():
    """A narrow SelecSLS trained for a few hundred steps: far above chance, so an accuracy drop shows.

    One thread: these convolutions are too small to gain from a second one, and on a busy
    machine the hand-off between threads costs more than the work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = selecsls.create_model(narrow_spec(16), num_classes=10, in_chans=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for images, targets, _ in batches("train", TRAIN_STEPS * BATCH, BATCH):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.card = model.card.with_image_size(IMG_SIZE, IMG_SIZE)
    return model.eval()


def int8_files(format: str, tmp_path: Path) -> tuple[Path, Path]:
    """(the path to export to, the file holding the weights)."""
    if format == "onnx":
        return tmp_path / "int8.onnx", tmp_path / "int8.onnx"
    pytest.importorskip("nncf")
    return tmp_path / "int8.xml", tmp_path / "int8.bin"


def load_int8(format: str, path: Path):
    return (
        session_runner(onnx_session(path))
        if format == "onnx"
        else openvino_ir.compiled_runner(openvino_ir.read_ir(path))
    )


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_int8_model_runs_and_stays_within_the_stated_accuracy_drop(trained, tmp_path, format):
    calibration = torch.cat([images for images, _, _ in batches("train", 64)])
    validation = batches("val", 500)
    path, weights = int8_files(format, tmp_path)
    checks, comparison = export_int8(
        trained, path, calibration, validation, format=format, dynamic=True, max_drop=MAX_DROP
    )
    assert all(check.passed for check in checks)  # the fp32 graph it quantized was exact
    assert comparison.images == 500
    assert comparison.reference_top1 > 50.0  # a real classifier (chance is 10%)
    assert comparison.drop <= MAX_DROP
    assert comparison.agreement >= 90.0
    assert weights.stat().st_size < 0.5 * 4 * selecsls.count_params(trained)  # int8 weights, not fp32
    logits = load_int8(format, path)(validation[0].images)
    assert logits.shape == (100, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_a_drop_beyond_max_drop_fails_and_writes_nothing(trained, tmp_path, format):
    calibration = torch.cat([images for images, _, _ in batches("train", 16)])
    path, _ = int8_files(format, tmp_path)
    with pytest.raises(ValueError, match="more than --max-drop"):
        export_int8(trained, path, calibration, batches("val", 100), format=format, max_drop=-100.0)
    assert list(tmp_path.iterdir()) == []


def test_compare_accuracy_counts_hits_and_agreement():
    logits = torch.eye(4)
    targets = torch.tensor([0, 1, 2, 0])
    shifted = lambda x: x.roll(1, dims=1)  # noqa: E731 - predicts class (i + 1) % 4
    result = compare_accuracy(lambda x: x, shifted, [(logits, targets)])
    assert result == AccuracyComparison(images=4, reference_top1=75.0, candidate_top1=25.0, agreement=0.0)
    assert result.drop == 50.0
