from pathlib import Path

import numpy as np
import pytest
import torch

from selecsls.data.batching import SkippedImage, TransformedDataset, balanced_subset, build_loader, collate_skipping
from selecsls.data.classes import UnknownClassError
from selecsls.data.datasets import build_dataset
from selecsls.data.folders import ImageFolder, training_classes
from selecsls.data.idx import IdxDataset, read_idx
from selecsls.data.images import UnreadableImageError, open_image
from selecsls.data.transforms import build_eval_transform, build_train_transform
from training_fixtures import CLASS_COLOURS, corrupt_image, make_image_folder, write_idx, write_image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST IDX files not installed in {FASHION_MNIST} (CI installs them)",
)


# ------------------------------------------------------------------------- open_image
def test_open_image_decodes_fully(tmp_path):
    image = open_image(write_image(tmp_path / "a.png", (10, 20, 30), seed=0))
    assert image.size == (40, 36) and image.mode == "RGB"


def test_open_image_uses_jpeg_draft_mode_to_decode_downscaled(tmp_path):
    path = write_image(tmp_path / "big.jpg", (90, 90, 90), seed=0, size=(800, 600))
    image = open_image(path, draft_size=100)
    assert min(image.size) >= 100 and image.size[0] <= 200  # decoded at 1/4 scale
    assert open_image(path).size == (800, 600)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: corrupt_image(write_image(d / "t.jpg", (1, 2, 3), seed=0, size=(200, 200))), "truncated"),
        (lambda d: d / "missing.jpg", "no such file"),
        (lambda d: (d / "text.png").write_text("not an image") and d / "text.png", "cannot identify image file"),
    ],
)
def test_open_image_names_the_unreadable_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(UnreadableImageError, match=reason) as info:
        open_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------- IDX files
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte", array, compress)), array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    path = write_idx(tmp_path / "short", np.zeros((4, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"truncated or padded: header says \(4, 5\)"):
        read_idx(path)


def test_idx_pair_with_different_counts_is_an_error(tmp_path):
    images = write_idx(tmp_path / "i", np.zeros((3, 2, 2), np.uint8), compress=True)
    labels = write_idx(tmp_path / "l", np.zeros(2, np.uint8), compress=True)
    with pytest.raises(ValueError, match="does not match"):
        IdxDataset(images, labels)


def test_idx_data_has_no_label_names_and_reindexes_by_name(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8), compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 2, 1, 2], np.uint8), compress=False)
    val = build_dataset(tmp_path, "val")
    assert val.label_names is None and val.classes == ["0", "1", "2"] and val.targets.tolist() == [0, 2, 1, 2]
    reordered = build_dataset(tmp_path, "val", classes=["2", "1", "0", "3"])
    assert reordered.targets.tolist() == [2, 0, 1, 0] and reordered.classes == ["2", "1", "0", "3"]
    with pytest.raises(UnknownClassError, match=r"class\(es\) \['1' \(1 image\)\]") as info:
        build_dataset(tmp_path, "val", classes=["0", "2"])
    assert info.value.unknown == ["1"]


@needs_fashion_mnist
def test_fashion_mnist_splits_are_read_as_grayscale_images_with_their_class_names():
    train, val = build_dataset(FASHION_MNIST, "train"), build_dataset(FASHION_MNIST, "val")
    assert (len(train), len(val), len(train.classes)) == (60000, 10000, 10)
    assert train.label_names == val.label_names == train.classes
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.classes[train.targets[0]] == "Ankle boot"  # the well-known first training image
    image, target = val.load(0)
    assert image.mode == "L" and image.size == (28, 28) and 0 <= target < 10
    rgb = TransformedDataset(val, build_eval_transform(32, in_chans=3))[0][0]
    assert rgb.shape == (3, 32, 32) and torch.allclose(rgb[0] * 0.229 + 0.485, rgb[1] * 0.224 + 0.456, atol=1e-6)


# -------------------------------------------------------------------------- folders
def test_image_folder_lists_classes_and_samples(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    train = build_dataset(tmp_path, "train")
    assert train.classes == sorted(CLASS_COLOURS) and len(train) == 6
    assert train.targets == [0, 0, 1, 1, 2, 2]
    assert training_classes(tmp_path) == train.classes


def test_val_folder_uses_training_class_indices(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    for image in (tmp_path / "val" / "cat").iterdir():
        image.unlink()
    (tmp_path / "val" / "cat").rmdir()
    val = build_dataset(tmp_path, "val", classes=training_classes(tmp_path))
    assert val.targets == [1, 2]  # dog and fox keep their training indices


def test_val_class_unknown_to_training_is_an_error(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    write_image(tmp_path / "val" / "wolf" / "0.jpg", (0, 0, 0), seed=0)
    with pytest.raises(UnknownClassError, match=r"val' has class\(es\) \['wolf'\] that are not training classes"):
        build_dataset(tmp_path, "val", classes=training_classes(tmp_path))


@pytest.mark.parametrize(
    "present, used", [(("test",), "test"), (("validation", "test"), "validation"), (("test", "val"), "val")]
)
def test_val_split_is_the_first_of_val_validation_test(tmp_path, present, used):
    make_image_folder(tmp_path, per_class=1, splits=("train", *present))
    val = build_dataset(tmp_path, "val", classes=training_classes(tmp_path))
    assert val.source == str(tmp_path / used) and len(val) == 3 and val.targets == [0, 1, 2]


def test_balanced_subset_spans_all_classes_evenly_and_is_seeded():
    targets = [0] * 50 + [1] * 5 + [2] * 45  # sorted, like the files of a class-folder tree
    subset = balanced_subset(targets, 20, seed=3)
    counts = np.bincount([targets[i] for i in subset], minlength=3)
    assert len(set(subset)) == 20 and subset == sorted(subset)
    assert counts[1] == 5 and sorted(counts[[0, 2]].tolist()) == [7, 8]  # the small class is used up first
    even = np.bincount([targets[i] for i in balanced_subset(targets, 15, seed=3)], minlength=3)
    assert even.tolist() == [5, 5, 5]
    assert balanced_subset(targets, 20, seed=3) == subset
    assert balanced_subset(targets, 20, seed=4) != subset
    assert balanced_subset(targets, None) == balanced_subset(targets, 1000) == list(range(100))
    with pytest.raises(ValueError, match="at least 1 image"):
        balanced_subset(targets, 0)


def test_empty_class_folder_is_an_error(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    (tmp_path / "train" / "owl").mkdir()
    (tmp_path / "train" / "owl" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*owl' holds no images"):
        build_dataset(tmp_path, "train")


def test_missing_data_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(
        FileNotFoundError,
        match="no val data in .*/val/<class>/<image> or .*/validation/<class>/<image> or .*/test/<class>/<image> "
        "folders or IDX files t10k-images-idx3-ubyte",
    ):
        build_dataset(tmp_path, "val")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="has no class folders"):
        build_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(tmp_path, "test")


# ------------------------------------------------------------ skipping and batching
def test_corrupt_image_is_skipped_and_reported_not_raised(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    bad = corrupt_image(tmp_path / "train" / "dog" / "0.jpg")
    dataset = TransformedDataset(build_dataset(tmp_path, "train"), build_eval_transform(16))
    batches = list(build_loader(dataset, range(len(dataset)), batch_size=4, workers=0))
    assert sum(len(b.targets) for b in batches) == 5
    skipped = [s for b in batches for s in b.skipped]
    assert skipped == [SkippedImage(str(bad), skipped[0].reason)] and "truncated" in skipped[0].reason.lower()


def test_collate_of_only_unreadable_images_is_an_empty_batch():
    batch = collate_skipping([SkippedImage("a.jpg", "bad"), SkippedImage("b.jpg", "bad")])
    assert len(batch.targets) == 0 and len(batch.skipped) == 2


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    base = build_dataset(tmp_path, "train")
    transform = build_train_transform(24)
    first = TransformedDataset(base, transform, seed=3)[2][0]
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(TransformedDataset(base, transform, seed=3)[2][0], first)
    assert not torch.equal(TransformedDataset(base, transform, seed=3, epoch=1)[2][0], first)
    assert not torch.equal(TransformedDataset(base, transform, seed=4)[2][0], first)


def test_loader_in_worker_processes_matches_main_process(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    dataset = TransformedDataset(build_dataset(tmp_path, "train"), build_train_transform(16), seed=0)
    order = [5, 0, 3, 1, 4, 2]
    inline = list(build_loader(dataset, order, batch_size=3, workers=0))
    parallel = list(build_loader(dataset, order, batch_size=3, workers=2))
    for a, b in zip(inline, parallel):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_image_folder_rejects_a_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .* does not exist"):
        ImageFolder(tmp_path / "absent")
