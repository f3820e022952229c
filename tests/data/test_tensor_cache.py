import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from selecsls.data.batching import TransformedDataset
from selecsls.data.datasets import build_dataset
from selecsls.data.folders import ImageFolder
from selecsls.data.tensor_cache import CACHE_FORMAT, CacheError, CacheGeometry, open_or_build
from selecsls.data.transforms import build_eval_transform
from training_fixtures import SUBPROCESS_ENV, corrupt_image, make_image_folder, write_image


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=3)


SMALL = CacheGeometry(16)


def _cache(root, directory, split="train", geometry=SMALL):
    messages = []
    cache = open_or_build(build_dataset(root, split), directory, split, geometry, log=messages.append)
    return cache, messages


def test_cache_keeps_the_folders_class_mapping_names_and_order(folder, tmp_path):
    cache, messages = _cache(folder, tmp_path / "cache")
    images = build_dataset(folder, "train")
    assert cache.classes == images.classes == images.label_names == ["cat", "dog", "fox"]
    assert cache.targets.tolist() == images.targets
    assert cache.pixels.shape == (9, 3, 16, 16) and cache.pixels.dtype == np.uint8
    assert isinstance(cache.pixels, np.memmap)  # read from disk on demand, not loaded whole
    assert len(messages) == 1 and "building the train tensor cache" in messages[0]
    # Built once: the second open reads it and says nothing.
    again, messages = _cache(folder, tmp_path / "cache")
    assert messages == [] and np.array_equal(again.pixels, cache.pixels)


def test_cached_pixels_are_the_eval_pipelines_pixels_exactly(folder, tmp_path):
    # The validation cache stores the eval geometry: normalising a cached batch gives bit for bit the
    # tensors of the per-image eval pipeline, so validation scores do not depend on the data path.
    transform = build_eval_transform(16, crop_pct=0.875)
    geometry = CacheGeometry(16, 0.875, "bilinear", 3)
    cache, _ = _cache(folder, tmp_path / "cache", "val", geometry)
    batch = cache.batch([4, 0, 7])
    per_image = TransformedDataset(build_dataset(folder, "val", ["cat", "dog", "fox"]), transform)
    expected = torch.stack([per_image[i][0] for i in (4, 0, 7)])
    assert torch.equal(transform.to_tensor.normalize(batch.images), expected)
    assert batch.targets.tolist() == [per_image[i][1] for i in (4, 0, 7)]


def test_unreadable_images_keep_their_rows_and_are_reported_per_batch(folder, tmp_path):
    corrupt_image(folder / "train" / "dog" / "1.png")
    cache, _ = _cache(folder, tmp_path / "cache")
    row = [path for path, _ in ImageFolder(folder / "train").samples].index(str(folder / "train" / "dog" / "1.png"))
    assert list(cache.unreadable) == [row]
    batch = cache.batch([row, 0])
    assert len(batch.images) == 1 and batch.targets.tolist() == [0]
    assert [s.path for s in batch.skipped] == [str(folder / "train" / "dog" / "1.png")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: write_image(root / "train" / "cat" / "new.jpg", (1, 2, 3), 5), "holds another number of images"),
        (lambda root: (root / "train" / "cat" / "0.jpg").unlink(), "holds another number of images"),
        (lambda root: os.utime(root / "train" / "fox" / "2.jpg", ns=(1, 1)), "is stale"),
        (lambda root: write_image(root / "train" / "dog" / "0.jpg", (9, 9, 9), 7), "is stale"),
        (
            lambda root: (root / "train" / "dog" / "2.jpg").rename(root / "train" / "cat" / "moved.jpg"),
            "is stale",
        ),
    ],
)
def test_a_stale_cache_is_refused_with_the_fix(folder, tmp_path, change, message):
    _cache(folder, tmp_path / "cache")
    change(folder)
    with pytest.raises(CacheError, match=message) as error:
        _cache(folder, tmp_path / "cache")
    assert "delete" in str(error.value) and "to rebuild it" in str(error.value)


def test_a_foreign_cache_is_refused(folder, tmp_path):
    other = make_image_folder(tmp_path / "other", per_class=3)
    _cache(other, tmp_path / "cache")
    with pytest.raises(CacheError, match="was built from another folder"):
        _cache(folder, tmp_path / "cache")


def test_a_damaged_or_alien_cache_is_refused(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    _cache(folder, cache_dir)
    [pixels] = cache_dir.glob("*.npy")
    [sidecar] = cache_dir.glob("*.json")
    np.save(pixels, np.zeros((9, 3, 8, 8), np.uint8))
    with pytest.raises(CacheError, match="is damaged"):
        _cache(folder, cache_dir)
    sidecar.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CacheError, match=f"is not a {CACHE_FORMAT} tensor cache"):
        _cache(folder, cache_dir)
    sidecar.write_text("{not json")
    with pytest.raises(CacheError, match="cannot be read"):
        _cache(folder, cache_dir)


def test_a_failed_build_leaves_nothing_behind(folder, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", broken)
    with pytest.raises(
        CacheError, match="cannot build the tensor cache .*No space left on device.*nothing was written"
    ):
        _cache(folder, tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [".train-16px-bilinear-rgb.lock"]


def test_bad_geometry_is_one_clear_error():
    with pytest.raises(CacheError, match="interpolation must be one of"):
        CacheGeometry(16, interpolation="nearest")
    with pytest.raises(CacheError, match="crop_pct must be in"):
        CacheGeometry(16, crop_pct=0)


def test_runs_started_together_build_the_cache_once(folder, tmp_path):
    # Two processes open the same missing cache at once: one builds it, the other waits and reads it.
    code = (
        "import sys; from selecsls.data.datasets import build_dataset; "
        "from selecsls.data.tensor_cache import CacheGeometry, open_or_build; "
        "open_or_build(build_dataset(sys.argv[1], 'train'), sys.argv[2], 'train', CacheGeometry(16))"
    )
    command = [sys.executable, "-c", code, str(folder), str(tmp_path / "cache")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sum("building the train tensor cache" in out for out in outputs) == 1


# ------------------------------------------------------------------ issue 27: disk space, damage, subsets
@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, unmounted afterwards: a disk that fills up for real (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("filling a real disk needs a small tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _build_in_a_process(folder, directory, prelude=""):
    """Build the train cache (64 px: 110 KB for 9 images) in a fresh process: a crash there cannot take pytest down."""
    code = (
        f"import sys, os, shutil, numpy as np\n{prelude}\n"
        "from selecsls.data.datasets import build_dataset\n"
        "from selecsls.data.tensor_cache import CACHE_FORMAT, CacheError, CacheGeometry, open_or_build\n"
        "try:\n"
        "    open_or_build(build_dataset(sys.argv[1], 'train'), sys.argv[2], 'train', CacheGeometry(64))\n"
        "except CacheError as exc:\n"
        "    sys.exit(f'error: {exc}')\n"
    )
    command = [sys.executable, "-c", code, str(folder), str(directory)]
    return subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)


def _temporaries(directory):
    return [path.name for path in directory.iterdir() if not path.name.endswith(".lock")]


def test_a_full_disk_is_one_line_naming_the_space_needed_and_leaves_nothing(folder, small_disk):
    # disk_usage is told the disk is empty, so the build reaches the write itself, as when another
    # process fills the disk meanwhile: the space is reserved first, so no write through the map can fault.
    lie = "import types; shutil.disk_usage = lambda path: types.SimpleNamespace(total=1 << 40, used=0, free=1 << 40)"
    done = _build_in_a_process(folder, small_disk, lie)
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -7 (SIGBUS): a one-line error
    [line] = done.stderr.strip().splitlines()
    assert f"cannot build the tensor cache in {small_disk}: No space left on device, needs 115 kB" in line
    assert _temporaries(small_disk) == []


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(folder, small_disk):
    done = _build_in_a_process(folder, small_disk)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "it needs 115 kB and 66 kB are free" in done.stderr
    assert _temporaries(small_disk) == []


def test_a_killed_builders_temporary_files_are_removed_by_the_next_build(folder, tmp_path):
    kill = "import signal; np.memmap.flush = lambda self: os.kill(os.getpid(), signal.SIGKILL)"
    done = _build_in_a_process(folder, tmp_path / "cache", kill)
    assert done.returncode == -9
    assert _temporaries(tmp_path / "cache"), "the killed build left its temporary files"
    _cache(folder, tmp_path / "cache", geometry=CacheGeometry(64))
    assert sorted(_temporaries(tmp_path / "cache")) == ["train-64px-bilinear-rgb.json", "train-64px-bilinear-rgb.npy"]


def test_a_cache_whose_pixels_changed_in_place_is_refused(folder, tmp_path):
    cache, _ = _cache(folder, tmp_path / "cache")
    [pixels] = (tmp_path / "cache").glob("*.npy")
    offset = cache.pixels.offset
    data = bytearray(pixels.read_bytes())
    data[offset:] = np.random.default_rng(0).integers(0, 256, len(data) - offset, dtype=np.uint8).tobytes()
    pixels.write_bytes(bytes(data))  # same size: the shape and the sidecar still agree
    with pytest.raises(CacheError, match="pixels do not match the checksum .* delete .* to rebuild it"):
        _cache(folder, tmp_path / "cache")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda record: record.update(targets=["abc"] * len(record["targets"])), "'targets' must be"),
        (lambda record: record.update(unreadable={"abc": "x"}), "'unreadable' must be"),
        (lambda record: record.update(images="abc"), "'images' must be"),
        (lambda record: record.pop("checksum"), "'checksum' must be"),
        (lambda record: record.update(samples=[0, "x"]), "'samples' must be"),
    ],
)
def test_a_hand_edited_sidecar_names_the_file_the_problem_and_the_fix(folder, tmp_path, edit, problem):
    _cache(folder, tmp_path / "cache")
    [sidecar] = (tmp_path / "cache").glob("*.json")
    record = json.loads(sidecar.read_text())
    edit(record)
    sidecar.write_text(json.dumps(record))
    with pytest.raises(CacheError) as error:
        _cache(folder, tmp_path / "cache")
    message = str(error.value)
    assert str(sidecar) in message and problem in message and "to rebuild it" in message
    assert "invalid literal" not in message


def test_the_cache_holds_only_the_images_a_run_uses_and_says_its_size(folder, tmp_path):
    messages = []
    images = build_dataset(folder, "train")
    subset = open_or_build(images, tmp_path / "cache", "train", SMALL, log=messages.append, samples=[1, 4, 8])
    assert subset.pixels.shape == (3, 3, 16, 16)
    [message] = messages
    assert "3 of 9 images" in message and "at 16x16 px, 6 kB (once)" in message
    full, _ = _cache(folder, tmp_path / "full")
    batch = subset.batch([8, 1])
    assert torch.equal(batch.images, full.batch([8, 1]).images) and batch.targets.tolist() == [2, 0]
    with pytest.raises(CacheError, match="does not hold image 0"):
        subset.batch([0])
    # A full cache serves every subset: nothing more is built.
    messages.clear()
    open_or_build(images, tmp_path / "full", "train", SMALL, log=messages.append, samples=[1, 4, 8])
    assert messages == [] and len(list((tmp_path / "full").glob("*.npy"))) == 1
