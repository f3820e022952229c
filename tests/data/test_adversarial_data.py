"""Hostile data folders: FIFOs named like images, class folders linked to their parent, high bit-depth
and float images, IDX files with labels the model has no output for."""

import gzip
import os
import re
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import selecsls
from selecsls.cli import main
from selecsls.data.batching import TransformedDataset
from selecsls.data.datasets import build_dataset
from selecsls.data.folders import ImageFolder
from selecsls.data.idx import IdxDataset
from selecsls.data.images import UnreadableImageError, open_image, to_uint8
from selecsls.data.transforms import build_eval_transform
from selecsls.models.validation import MAX_CLASSES, InvalidInput
from sparse_models import sparse_tiny_model
from training_fixtures import make_image_folder


def _within(seconds, function):
    """Run ``function`` in a thread; fail (instead of hanging the suite) if it blocks."""
    result = {}

    def run():
        try:
            result["value"] = function()
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    root = make_image_folder(tmp_path, per_class=2)
    fifo = root / "val" / "cat" / "pipe.jpg"
    os.mkfifo(fifo)
    dataset = _within(10, lambda: build_dataset(root, "val"))
    assert str(fifo) not in [path for path, _ in dataset.samples] and len(dataset) == 6
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        _within(10, lambda: open_image(fifo))


def test_a_class_folder_linked_to_its_parent_is_refused(tmp_path):
    root = make_image_folder(tmp_path, per_class=2)
    (root / "train" / "all").symlink_to(root / "train", target_is_directory=True)
    with pytest.raises(ValueError, match="is found under class folders 'all' and 'cat'.*one class"):
        build_dataset(root, "train")


def test_an_image_linked_twice_in_one_class_counts_once(tmp_path):
    root = make_image_folder(tmp_path, per_class=2)
    (root / "train" / "cat" / "again.jpg").symlink_to(root / "train" / "cat" / "0.jpg")
    assert len(ImageFolder(root / "train")) == 6


def _gradient(dtype, top):
    return (np.linspace(0, 1, 32 * 32).reshape(32, 32) * top).astype(dtype)


@pytest.mark.parametrize(
    "pixels, suffix",
    [(_gradient(np.uint16, 65535), ".png"), (_gradient(np.float32, 1.0), ".tif"), (_gradient(np.int32, 65535), ".tif")],
)
def test_high_bit_depth_and_float_images_keep_their_contrast(tmp_path, pixels, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path)
    decoded = np.asarray(open_image(path).convert("L"))
    assert decoded.min() == 0 and decoded.max() == 255
    assert len(np.unique(decoded)) > 200, "flattened to a few values"
    tensor = build_eval_transform(32, crop_pct=1.0)(open_image(path))
    assert float(tensor.std()) > 0.5


def test_to_uint8_scales_each_kind_of_range():
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 100, 255], dtype=np.int32)).tolist() == [0, 100, 255]
    assert to_uint8(np.array([0, 65535], dtype=np.uint16)).tolist() == [0, 255]
    assert to_uint8(np.array([-1.0, 0.0, 3.0])).tolist() == [0, 64, 255]
    assert to_uint8(np.array([0, 4095], dtype=np.uint16), bits=12).tolist() == [0, 255]
    assert to_uint8(np.array([np.nan, 1.0])).tolist() == [0, 255]


def _write_idx(path, array: np.ndarray):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D, np.dtype(">i4"): 0x0C}
    array = array.astype(array.dtype.newbyteorder(">")) if array.dtype != np.uint8 else array
    header = b"\0\0" + bytes([codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def _idx_folder(root, train_labels, val_labels, images=None):
    images = images if images is not None else np.zeros((len(train_labels), 8, 8), np.uint8)
    for prefix, labels in (("train", train_labels), ("t10k", val_labels)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[: len(labels)])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(labels, np.uint8))
    return root


def test_float_idx_images_are_scaled_not_truncated(tmp_path):
    images = np.random.default_rng(0).random((4, 8, 8)).astype(">f4")
    _write_idx(tmp_path / "i.gz", images)
    _write_idx(tmp_path / "l.gz", np.arange(4, dtype=np.uint8))
    dataset = IdxDataset(tmp_path / "i.gz", tmp_path / "l.gz")
    assert len(np.unique(dataset.images)) > 100
    assert np.abs(dataset.images / 255.0 - images).max() < 0.01


def test_validation_labels_beyond_the_training_classes_fail_before_training(tmp_path):
    # Only the stray label is named, with its count: not every index up to it ('3', '4', '5').
    root = _idx_folder(tmp_path, train_labels=[0, 1, 2, 1, 0, 1, 2], val_labels=[0, 1, 2, 5, 1, 2, 0])
    classes = build_dataset(root, "train").classes
    with pytest.raises(ValueError, match=r"has class\(es\) \['5' \(1 image\)\] that are not training classes"):
        build_dataset(root, "val", classes)


def test_idx_training_labels_that_skip_class_indices_are_refused_unless_asked(tmp_path):
    # A stray 255 among labels 0-2 made a 256-class model without a word.
    root = _idx_folder(tmp_path, train_labels=[0, 1, 2, 255, 1, 255, 0], val_labels=[0, 1])
    with pytest.raises(ValueError) as error:
        build_dataset(root, "train")
    message = str(error.value)
    assert "train-labels-idx1-ubyte.gz" in message and "skip class indices 3-254" in message
    assert "label 255 (2 images)" in message and "--label-gaps" in message
    assert len(build_dataset(root, "train", label_gaps=True).classes) == 256
    # Validation labels index the training classes: a class without validation images is no gap.
    _idx_folder(tmp_path, train_labels=[0, 1, 2, 1], val_labels=[0, 2])
    assert build_dataset(root, "val").classes == ["0", "1", "2"]


def test_negative_or_fractional_idx_labels_are_refused(tmp_path):
    _write_idx(tmp_path / "i.gz", np.zeros((2, 8, 8), np.uint8))
    _write_idx(tmp_path / "l.gz", np.array([0.5, 1.0], ">f4"))
    with pytest.raises(ValueError, match="must be non-negative integers"):
        IdxDataset(tmp_path / "i.gz", tmp_path / "l.gz")


def test_skipped_samples_stay_skipped_with_a_fifo_in_the_list(tmp_path):
    """Even if a FIFO appears after listing, reading it reports it as unreadable instead of blocking."""
    root = make_image_folder(tmp_path, per_class=1)
    dataset = build_dataset(root, "val")
    victim = dataset.samples[0][0]
    os.unlink(victim)
    os.mkfifo(victim)
    sample = _within(10, lambda: TransformedDataset(dataset, build_eval_transform(16))[0])
    assert sample.reason.endswith("not a regular file")


# ------------------------------------------------------------------------------- issue 19, part A
@pytest.mark.parametrize(
    "header, message",
    [
        (b"\0\0\x08\x03\0\0", r"is truncated: its header declares 3 dimensions \(16 bytes\) but the file holds 6"),
        (b"\0\0\x08\xc8" + bytes(8), r"is truncated: its header declares 200 dimensions \(804 bytes\) but the file"),
    ],
    ids=["short", "200 dimensions"],
)
def test_a_truncated_idx_header_is_one_clear_error(tmp_path, capsys, header, message):
    root = _idx_folder(tmp_path, train_labels=[0, 1], val_labels=[0, 1])
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    with pytest.raises(ValueError, match=message):
        build_dataset(root, "train")
    selecsls.save(sparse_tiny_model(num_classes=2), tmp_path / "m.pt")  # int8 export reads it as calibration data
    export = ["export", str(tmp_path / "m.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--int8"]
    assert main([*export, "--calibration", str(root)]) == 2
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "m.onnx").exists()


def test_idx_images_of_zero_pixels_are_refused(tmp_path):
    root = _idx_folder(tmp_path, [0, 1], [0, 1], images=np.zeros((2, 0, 0), np.uint8))
    with pytest.raises(ValueError, match="are 0x0 pixels: no pixels to learn from"):
        build_dataset(root, "train")


def test_an_idx_label_beyond_the_class_limit_is_refused_before_a_class_list_is_made(tmp_path):
    """One label of 2e9 made a list of 2e9 class names (11 GB, then MemoryError); the limit is checked first."""
    _write_idx(tmp_path / "i.gz", np.zeros((2, 8, 8), np.uint8))
    _write_idx(tmp_path / "l.gz", np.array([0, MAX_CLASSES], np.int32))
    with pytest.raises(InvalidInput, match=f"class index {MAX_CLASSES}; at most {MAX_CLASSES:,} classes are supported"):
        IdxDataset(tmp_path / "i.gz", tmp_path / "l.gz")
    _write_idx(tmp_path / "l.gz", np.array([0, MAX_CLASSES - 1], np.int32))
    assert len(IdxDataset(tmp_path / "i.gz", tmp_path / "l.gz").classes) == MAX_CLASSES


@pytest.mark.parametrize("linked", ["val", "val/cat", "t10k-images-idx3-ubyte.gz"])
def test_validation_data_that_is_the_training_data_is_refused(tmp_path, linked):
    root = _idx_folder(tmp_path, [0, 1], [0, 1]) if linked.startswith("t10k") else make_image_folder(tmp_path, 1)
    target = root / linked.replace("val", "train").replace("t10k", "train")
    if (root / linked).is_dir():
        shutil.rmtree(root / linked)
    else:
        (root / linked).unlink()
    (root / linked).symlink_to(target)
    with pytest.raises(ValueError, match=f"validation data '{root / linked}' is the training data '{target}' .*link"):
        build_dataset(root, "val")


def test_a_class_folder_that_cannot_be_read_says_so(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path, per_class=1)
    locked = root / "train" / "dog"
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: refuse it as the kernel refuses everyone else
        scandir = os.scandir
        monkeypatch.setattr(os, "scandir", lambda path=".": _denied(path) if Path(path) == locked else scandir(path))
    try:
        with pytest.raises(ValueError, match=f"cannot read folder '{locked}': Permission denied"):
            build_dataset(root, "train")
    finally:
        locked.chmod(0o755)


def _denied(path):
    raise PermissionError(13, "Permission denied", os.fspath(path))
