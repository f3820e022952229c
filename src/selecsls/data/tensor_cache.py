"""A split of an image folder decoded once into one memory-mapped uint8 array.

At 32 px the JPEG decode and the PIL transforms of every image in every epoch cost more than
they are worth, and on a GPU they starve it. A :class:`TensorCache` holds the split's pixels
as they leave a fixed resize-and-centre-crop (``(N, C, S, S)`` uint8, one ``.npy`` file) with the
class mapping, targets and a fingerprint of the files beside it (a ``.json`` sidecar). The pair
is written atomically, built once, and refused when the folder has changed since (stale: a file's
path, size or modification time differs, the level of Hugging Face datasets' fingerprint), when it
was built from another folder or with other settings (foreign), or when its pixels no longer match
the sha256 in the sidecar (damaged; checked on every open, one read of the array). Augmentation then
runs as batched tensor ops on the training device (:mod:`selecsls.data.batch_augment`).

A cache holds the images a run uses (all of the split, or the ``samples`` a ``--limit`` draws), in
the folder's sample order (an unreadable image keeps its row, marked); it is indexed by the folder's
sample index, so subsets, epoch orders and resumption index the cache as they index the folder.
The space is checked and reserved before anything is written: a full disk is one error, not a
crash of the process writing through the memory map.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from selecsls._io import PathLike, atomic_paths, printable, remove_stale_temp_files
from selecsls.data.batching import Batch, SkippedImage, TransformedDataset, build_loader
from selecsls.data.folders import ImageFolder
from selecsls.data.transforms import EvalTransform, ToUint8Tensor
from selecsls.models.validation import (
    InvalidInput,
    check_crop_pct,
    check_image_channels,
    check_img_side,
    check_interpolation,
)

__all__ = ["CACHE_FORMAT", "CacheError", "CacheGeometry", "TensorCache", "open_or_build", "pixel_checksum"]

#: Written into every sidecar; a cache of another format version is refused, never misread.
CACHE_FORMAT = "selecsls-tensor-cache/2"


class CacheError(ValueError):
    """A tensor cache that cannot be used for this data (stale, foreign, damaged) or cannot be built."""


@dataclass(frozen=True)
class CacheGeometry:
    """How every image becomes the stored ``size`` x ``size`` square: the shorter side resized to
    ``size / crop_pct`` with ``interpolation``, then centre-cropped (the eval pipeline's geometry;
    ``crop_pct=1`` keeps the whole shorter side). ``in_chans`` 3 stores RGB, 1 luminance."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    in_chans: int = 3

    def __post_init__(self) -> None:
        try:  # the eval pipeline's limits: this is its geometry
            check_img_side("cache image size", self.size)
            check_crop_pct("cache crop_pct", self.crop_pct)
            check_interpolation("cache interpolation", self.interpolation)
            check_image_channels("cache in_chans", self.in_chans)
        except InvalidInput as exc:
            raise CacheError(str(exc)) from None

    @property
    def file_stem(self) -> str:
        crop = "" if self.crop_pct == 1 else f"-crop{self.crop_pct:g}"
        return f"{self.size}px{crop}-{self.interpolation}-{'rgb' if self.in_chans == 3 else 'gray'}"

    def transform(self) -> EvalTransform:
        return EvalTransform(self.size, self.crop_pct, self.interpolation, ToUint8Tensor(self.in_chans))


def fingerprint(folder: ImageFolder, samples: Sequence[int]) -> str:
    """sha256 over each of the ``samples``' path (relative to the folder), class, size and modification time:
    any of them added, removed, renamed, moved between classes or rewritten changes it. An edit that keeps a
    file's size and modification time goes unnoticed (the price of not reading every image on every run)."""
    digest = hashlib.sha256()
    for path, target in (folder.samples[i] for i in samples):
        info = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder.root)}\0{target}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


#: Bytes hashed at a time: the checksum reads a memory-mapped cache without loading it whole.
_CHECKSUM_CHUNK = 1 << 26


def pixel_checksum(pixels: np.ndarray) -> str:
    """sha256 of the array's bytes (0.3-0.5 s for 50,000 32x32 RGB images, 154 MB, on one core)."""
    digest = hashlib.sha256()
    flat = pixels.reshape(-1)
    for start in range(0, flat.size, _CHECKSUM_CHUNK):
        digest.update(flat[start : start + _CHECKSUM_CHUNK])
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorCache:
    """The decoded pixels of (part of) one split, memory-mapped, with its class mapping and targets."""

    pixels: np.ndarray  # (R, C, S, S) uint8, memory-mapped read-only
    samples: np.ndarray  # (R,) int64, ascending: the folder's sample index of each row
    targets: np.ndarray  # (R,) int64, the folder's class indices
    classes: list[str]
    unreadable: dict[int, str]  # sample index -> why the image could not be decoded (its row holds zeros)
    paths: Sequence[str]  # the folder's file per sample index, for reports

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Batch:
        """Samples ``indices`` as a uint8 batch on ``device``; unreadable images are dropped and reported."""
        keep = self._rows([i for i in indices if i not in self.unreadable])
        skipped = [SkippedImage(self.paths[i], self.unreadable[i]) for i in indices if i in self.unreadable]
        pixels = torch.from_numpy(self.pixels[keep])  # fancy indexing copies the rows out of the map
        targets = torch.from_numpy(self.targets[keep])
        return Batch(pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True), skipped)

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        wanted = np.asarray(indices, dtype=np.int64)
        rows = np.minimum(np.searchsorted(self.samples, wanted), len(self.samples) - 1)
        missing = wanted[self.samples[rows] != wanted]
        if len(missing):
            raise CacheError(f"the tensor cache does not hold image {missing[0]} ({printable(self.paths[missing[0]])})")
        return rows


def _paths(directory: Path, split: str, geometry: CacheGeometry, samples: list[int] | None) -> tuple[Path, Path]:
    """The cache's files: one name per split and geometry, and per subset (its size and a hash of its indices)."""
    stem = f"{split}-{geometry.file_stem}"
    if samples is not None:
        tag = hashlib.sha256(json.dumps(samples).encode()).hexdigest()[:12]
        stem = f"{split}-{len(samples)}images-{tag}-{geometry.file_stem}"
    return directory / f"{stem}.npy", directory / f"{stem}.json"


def open_or_build(
    folder: ImageFolder,
    directory: PathLike,
    split: str,
    geometry: CacheGeometry,
    workers: int = 0,
    log=print,
    samples: Sequence[int] | None = None,
) -> TensorCache:
    """The cache of ``folder`` (its ``samples``, default all) under ``directory`` for ``split`` and ``geometry``:
    opened when it is there (after checking it still describes the folder), built (once, atomically) when it
    is not. A cache of the whole split serves any subset of it."""
    if not isinstance(folder, ImageFolder):
        raise CacheError("a tensor cache is built from class folders of images; IDX files are already decoded arrays")
    held = _subset(folder, samples)
    if held is not None and _paths(Path(directory), split, geometry, None)[1].exists():
        held = None
    pixels_path, sidecar_path = _paths(Path(directory), split, geometry, held)
    expected = _description(folder, split, geometry, held)
    with _build_lock(pixels_path):  # runs started together share one build: the others wait, then open it
        remove_stale_temp_files(pixels_path.parent, [pixels_path.name])  # a killed builder's files
        built = not sidecar_path.exists() and not pixels_path.exists()
        if built:
            _build(folder, geometry, expected, pixels_path, sidecar_path, workers, log)
    return _open(folder, pixels_path, sidecar_path, expected, verify_pixels=not built)  # built: just checksummed


def _subset(folder: ImageFolder, samples: Sequence[int] | None) -> list[int] | None:
    """``samples`` sorted and checked, or None for the whole folder."""
    if samples is None:
        return None
    held = sorted(set(int(i) for i in samples))
    if not held or held[0] < 0 or held[-1] >= len(folder):
        raise CacheError(f"cache samples must be some of the image indices 0 to {len(folder) - 1} of {folder.source}")
    return None if len(held) == len(folder) else held


@contextlib.contextmanager
def _build_lock(pixels_path: Path) -> Iterator[None]:
    """An exclusive lock (``flock``) on a hidden file beside the cache, released when the process ends."""
    lock = pixels_path.with_name(f".{pixels_path.stem}.lock")
    try:
        pixels_path.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as exc:
        raise CacheError(f"cannot write the tensor cache in {printable(pixels_path.parent)}: {exc}") from None
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _description(folder: ImageFolder, split: str, geometry: CacheGeometry, samples: list[int] | None) -> dict:
    return dict(
        format=CACHE_FORMAT,
        source=os.path.realpath(folder.root),
        split=split,
        geometry=asdict(geometry),
        classes=list(folder.classes),
        images=len(folder),
        samples=samples,
        fingerprint=fingerprint(folder, range(len(folder)) if samples is None else samples),
    )


def _build(
    folder: ImageFolder,
    geometry: CacheGeometry,
    description: dict,
    pixels_path: Path,
    sidecar_path: Path,
    workers: int,
    log,
) -> None:
    """Decode the samples into the array, after saying its size and checking and reserving the space."""
    samples = description["samples"] if description["samples"] is not None else list(range(len(folder)))
    shape = (len(samples), geometry.in_chans, geometry.size, geometry.size)
    place = printable(pixels_path.parent)
    needed_bytes = math.prod(shape) + _HEADER_BYTES
    needed = _size(needed_bytes)
    count = f"{len(samples)} of {len(folder)}" if len(samples) < len(folder) else f"{len(folder)}"
    log(
        f"building the {description['split']} tensor cache {printable(pixels_path)}: {count} images from "
        f"{printable(folder.source)} at {geometry.size}x{geometry.size} px, {needed} (once)"
    )
    free = shutil.disk_usage(pixels_path.parent).free
    if free < needed_bytes:
        raise CacheError(
            f"cannot build the tensor cache in {place}: it needs {needed} and {_size(free)} are free; free "
            "some space or choose another cache directory (nothing was written)"
        )
    try:
        with atomic_paths(pixels_path, sidecar_path) as (pixels_tmp, sidecar_tmp):
            pixels = np.lib.format.open_memmap(pixels_tmp, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(pixels_tmp)
            unreadable = _decode_into(pixels, folder, samples, geometry, workers)
            pixels.flush()
            record = dict(
                description,
                targets=[int(folder.targets[i]) for i in samples],
                unreadable={str(i): reason for i, reason in unreadable.items()},
                checksum=pixel_checksum(pixels),
            )
            del pixels
            sidecar_tmp.write_text(json.dumps(record) + "\n")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"cannot build the tensor cache in {place}: {os.strerror(exc.errno)}, needs {needed} "
                "(nothing was written); free some space or choose another cache directory"
            ) from None
        raise CacheError(
            f"cannot build the tensor cache in {place}: {exc.strerror or exc} (nothing was written)"
        ) from None


#: Room for the ``.npy`` header on top of the pixels (numpy pads it to a multiple of 64 bytes).
_HEADER_BYTES = 4096


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _reserve(path: Path) -> None:
    """Allocate the file's blocks before writing: a write through a memory map onto a full disk kills the process
    (SIGBUS) instead of raising, and leaves the file behind."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as is
                raise


def _decode_into(
    pixels: np.ndarray, folder: ImageFolder, samples: list[int], geometry: CacheGeometry, workers: int
) -> dict[int, str]:
    """Row r of ``pixels`` <- sample ``samples[r]``; returns sample index -> reason for images that cannot be read
    (their rows stay zero)."""
    index_of = {folder.samples[i][0]: i for i in samples}
    unreadable: dict[int, str] = {}
    loader = build_loader(TransformedDataset(folder, geometry.transform()), samples, 256, workers)
    row = 0
    for batch in loader:  # in sample order; skipped images leave their rows at zero
        unreadable.update((index_of[image.path], image.reason) for image in batch.skipped)
        size = len(batch.targets) + len(batch.skipped)
        good = [r for r in range(row, row + size) if samples[r] not in unreadable]
        pixels[good] = batch.images.numpy()
        row += size
    return unreadable


def _open(
    folder: ImageFolder, pixels_path: Path, sidecar_path: Path, expected: dict, verify_pixels: bool
) -> TensorCache:
    where = printable(sidecar_path)
    fix = f"delete {printable(pixels_path)} and {where} to rebuild it, or pass another cache directory"
    try:
        record = json.loads(sidecar_path.read_text())
        pixels = np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CacheError(f"tensor cache {where} cannot be read ({exc}); {fix}") from None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise CacheError(f"{where} is not a {CACHE_FORMAT} tensor cache (format {found!r:.60}); {fix}")
    _check_fields(record, where, fix)
    for key, problem in (
        ("source", "was built from another folder"),
        ("split", "holds another split"),
        ("geometry", "was built with other settings"),
        ("classes", "has other classes"),
        ("images", "holds another number of images"),
        ("samples", "holds other images of the folder (another --limit or seed)"),
        ("fingerprint", "is stale: files were added, removed or changed since it was built"),
    ):
        if record.get(key) != expected[key]:
            found, wanted = record.get(key), expected[key]
            detail = f" ({found!r:.120} there, {wanted!r:.120} now)" if key not in ("fingerprint", "samples") else ""
            raise CacheError(f"tensor cache {where} {problem}{detail}; {fix}")
    samples = np.arange(expected["images"]) if expected["samples"] is None else np.asarray(expected["samples"])
    shape = (len(samples), *(expected["geometry"][k] for k in ("in_chans", "size", "size")))
    targets = np.asarray(record["targets"], dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.shape != shape or len(targets) != shape[0]:
        found = f"shape {pixels.shape}, expected {shape}"
        raise CacheError(f"tensor cache {printable(pixels_path)} is damaged ({found}); {fix}")
    if not np.array_equal(targets, np.asarray(folder.targets, dtype=np.int64)[samples]):
        raise CacheError(f"tensor cache {where} has other class targets than the folder; {fix}")
    if verify_pixels and pixel_checksum(pixels) != record["checksum"]:
        raise CacheError(
            f"tensor cache {printable(pixels_path)} is damaged: its pixels do not match the checksum it was built "
            f"with; {fix}"
        )
    unreadable = {int(row): reason for row, reason in record["unreadable"].items()}
    paths = [path for path, _ in folder.samples]
    return TensorCache(pixels, samples.astype(np.int64), targets, list(folder.classes), unreadable, paths)


def _check_fields(record: dict, where: str, fix: str) -> None:
    """Every field the reader uses has the type it uses: a hand-edited sidecar is one clear error, not a crash."""

    def index(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    unreadable, samples = record.get("unreadable"), record.get("samples")
    for key, valid, meaning in (
        ("images", index(record.get("images")), "the number of images (a non-negative integer)"),
        ("samples", samples is None or isinstance(samples, list) and all(map(index, samples)), "null or indices"),
        ("targets", isinstance(record.get("targets"), list) and all(map(index, record["targets"])), "class indices"),
        (
            "unreadable",
            isinstance(unreadable, dict) and all(k.isdigit() and isinstance(v, str) for k, v in unreadable.items()),
            "a map of image indices to reasons",
        ),
        (
            "checksum",
            isinstance(record.get("checksum"), str) and re.fullmatch("[0-9a-f]{64}", record["checksum"]),
            "the sha256 of the pixels (64 hex digits)",
        ),
    ):
        if not valid:
            raise CacheError(f"tensor cache {where} is damaged: '{key}' must be {meaning}; {fix}")
