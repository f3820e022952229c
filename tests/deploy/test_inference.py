"""``selecsls predict`` / :class:`Predictor`: top-k class names on real image files, every backend, clear errors."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.deploy.backends import Backend, BackendUnavailable
from selecsls.deploy.inference import Predictor, class_names, imagenet_class_names
from selecsls.models.card import ModelCard
from training_fixtures import corrupt_image, narrow_spec, write_image

CLASSES = ["cat", "dog", "fox"]


def biased_model(num_classes: int, favourite: int, label_names=None):
    """A small model whose classifier bias makes ``favourite`` the clear top-1 for any image."""
    model = selecsls.create_model(narrow_spec(8), num_classes=num_classes)
    with torch.no_grad():
        model.fc.bias[favourite] = 8.0
    model.card = replace(model.card.with_image_size(64, 64), label_names=label_names)
    return model.eval()


@pytest.fixture
def image(tmp_path):
    return write_image(tmp_path / "photo.jpg", (40, 200, 40), seed=0, size=(120, 90))


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "trained.pt"
    selecsls.save(biased_model(3, favourite=1, label_names=CLASSES), path)
    return path


def test_predict_prints_topk_with_training_class_names(checkpoint, image, capsys):
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "backend: frozen"  # auto: selecsls.freeze on the CPU
    assert lines[1] == str(image)
    assert lines[2].split()[:2] == ["1.", "dog"] and float(lines[2].split()[-1].rstrip("%")) > 99.0
    assert len(lines) == 4 and lines[3].split()[0] == "2."


def test_a_1000_class_model_reports_imagenet_names(image):
    predictor = Predictor.from_model(biased_model(1000, favourite=207), backend="eager")
    (prediction,) = predictor.predict([image], topk=5)
    assert prediction.classes[0][0] == "golden retriever"
    assert len(prediction.classes) == 5
    assert all(a[1] >= b[1] for a, b in zip(prediction.classes, prediction.classes[1:]))


def test_imagenet_class_names_are_the_1000_ilsvrc_classes():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[0], names[1], names[207], names[999]) == ("tench", "goldfish", "golden retriever", "toilet tissue")


def test_class_names_fall_back_to_indices_and_reject_a_foreign_list():
    assert class_names(ModelCard("net", num_classes=3)) == ["class 0", "class 1", "class 2"]
    with pytest.raises(ValueError, match="label_names must be a list of 3 class names, one per output"):
        ModelCard("net", num_classes=3, label_names=["a", "b"])


def test_every_backend_and_the_exported_file_give_the_same_probabilities(checkpoint, image, tmp_path):
    model = selecsls.load(checkpoint)
    results = {
        backend: Predictor.from_model(model, backend).predict([image, image], topk=3)
        for backend in ("eager", "fused", "onnxruntime")
    }
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--dynamic", "--out", str(onnx_path)]) == 0
    results["onnx file"] = Predictor.from_exported(onnx_path).predict([image], topk=3)
    reference = results["eager"][0].classes
    for backend, predictions in results.items():
        assert [name for name, _ in predictions[0].classes] == [name for name, _ in reference], backend
        assert [p for _, p in predictions[0].classes] == pytest.approx([p for _, p in reference], abs=1e-5), backend


def test_predict_rejects_a_missing_file(checkpoint, capsys):
    assert main(["predict", "no_such_image.jpg", "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "selecsls predict: error: image no_such_image.jpg does not exist"


def test_predict_rejects_an_unreadable_image(checkpoint, image, capsys):
    corrupt_image(image)
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--backend", "eager"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"selecsls predict: error: 1 of 1 image(s) could not be read: {image}"
    assert f"unreadable: cannot read image '{image}'" in captured.out


def test_predict_reports_a_checkpoint_model_mismatch(tmp_path, image, capsys):
    weights = tmp_path / "weights.pth"
    torch.save(selecsls.create_model("selecsls42b").state_dict(), weights)
    assert main(["predict", str(image), "--checkpoint", str(weights), "--model", "selecsls60"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit selecsls60" in err and "its shapes fit selecsls42b" in err and "\n" not in err


def test_predict_needs_weights(image, capsys):
    assert main(["predict", str(image)]) == 2
    assert "give --checkpoint FILE, or --model NAME" in capsys.readouterr().err


def test_a_fixed_batch_onnx_file_predicts_many_images(checkpoint, image, tmp_path):
    """An export without --dynamic has a batch of one; predict still takes several images at once."""
    onnx_path = tmp_path / "static.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx_path)]) == 0
    predictions = Predictor.from_exported(onnx_path).predict([image] * 3, topk=2)
    reference = Predictor.from_model(selecsls.load(checkpoint), "eager").predict([image], topk=2)[0].classes
    assert len(predictions) == 3
    for prediction in predictions:
        assert [p for _, p in prediction.classes] == pytest.approx([p for _, p in reference], abs=1e-5)


def test_benchmark_counts_every_image_and_decodes_beside_inference(checkpoint, tmp_path):
    predictor = Predictor.from_model(selecsls.load(checkpoint), "eager")
    paths = [write_image(tmp_path / f"{i}.jpg", (40, 200, 40), seed=i, size=(120, 90)) for i in range(6)]
    decode_threads = set()
    transform = predictor.transform

    def recording_transform(image):
        decode_threads.add(threading.current_thread().name)
        return transform(image)

    recording_transform.draft_size = transform.draft_size
    predictor.transform = recording_transform
    rate = predictor.benchmark(paths, decode_threads=2, prefetch=2)
    assert rate.images == 6 and rate.frames_per_s > 0
    assert 0 < rate.inference_seconds <= rate.seconds
    assert "6 images in" in str(rate) and "frames/s end to end" in str(rate)
    assert any(name.startswith("selecsls-decode") for name in decode_threads)  # not on the inference thread


def test_predict_benchmark_reports_frames_per_second_of_a_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "frames"
    for i in range(4):
        write_image(folder / f"{i}.jpg", (200, 40, 40), seed=i, size=(120, 90))
    write_image(folder / "more" / "4.png", (200, 40, 40), seed=4, size=(64, 64))
    (folder / "notes.txt").write_text("not an image")
    argv = ["predict", "--benchmark", str(folder), "--checkpoint", str(checkpoint), "--backend", "fused"]
    assert main(argv) == 0
    backend, rate = capsys.readouterr().out.splitlines()
    assert backend == "backend: fused"
    assert rate.startswith("5 images in") and float(rate.split(": ")[1].split()[0]) > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "{folder}", "{image}"], "--benchmark takes its images from FOLDER: drop the IMAGE arguments"),
        (["--benchmark", "{folder}/missing"], "--benchmark folder {folder}/missing does not exist"),
        (["--benchmark", "{folder}/empty"], "--benchmark folder {folder}/empty holds no images"),
        ([], "give at least one IMAGE to classify (or --benchmark FOLDER)"),
    ],
)
def test_predict_benchmark_rejects_bad_folders_in_one_line(checkpoint, image, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    fill = dict(folder=tmp_path, image=image)
    argv = [part.format(**fill) for part in argv]
    assert main(["predict", *argv, "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**fill) in err and "\n" not in err


@pytest.mark.parametrize("network", ["selecsls", "resnet50"])
def test_auto_freezes_the_network_and_falls_back_to_eager_with_a_warning(monkeypatch, image, network):
    """auto runs the frozen model (selecsls.freeze); where it cannot be built, eager, and a warning says so."""
    if network == "selecsls":
        model = biased_model(3, favourite=2, label_names=CLASSES)
    else:
        model = selecsls.create_model(network, num_classes=3)
        model.card = replace(model.card.with_image_size(64, 64), label_names=CLASSES)
    assert Predictor.from_model(model.eval()).backend == "frozen"

    def unavailable(self, model, example):
        raise BackendUnavailable("torch.fx cannot trace it")

    monkeypatch.setattr(
        Backend,
        "build",
        lambda self, *args, build=Backend.build: (
            unavailable(self, *args) if self.name == "frozen" else build(self, *args)
        ),
    )
    with pytest.warns(UserWarning, match="frozen backend unavailable .*; trying eager"):
        predictor = Predictor.from_model(model.eval())
    assert predictor.backend == "eager"
    (prediction,) = predictor.predict([image], topk=1)
    assert prediction.classes[0][0] in CLASSES and (network != "selecsls" or prediction.classes[0][0] == "fox")
