"""A split of an image folder decoded once into one memory-mapped uint8 array.

At 32 px the JPEG decode and the PIL transforms of every image in every epoch cost more than
they are worth, and on a GPU they starve it. A :class:`TensorCache` holds the split's pixels
as they leave a fixed resize-and-centre-crop (``(N, C, S, S)`` uint8, one ``.npy`` file) with the
class mapping, targets and a fingerprint of the files beside it (a ``.json`` sidecar). The pair
is written atomically, built once, and refused when the folder has changed since (stale) or
when it was built from another folder or with other settings (foreign). Augmentation then runs
as batched tensor ops on the training device (:mod:`selecsls.data.batch_augment`).

Rows follow the folder's sample order exactly (an unreadable image keeps its row, marked), so
subsets, epoch orders and resumption index the cache as they index the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from selecsls._io import PathLike, atomic_paths, printable
from selecsls.data.datasets import Batch, ImageFolder, SkippedImage, TransformedDataset, build_loader
from selecsls.data.transforms import INTERPOLATIONS, EvalTransform, ToUint8Tensor

__all__ = ["CACHE_FORMAT", "CacheError", "CacheGeometry", "TensorCache", "open_or_build"]

#: Written into every sidecar; a cache of another format version is refused, never misread.
CACHE_FORMAT = "selecsls-tensor-cache/1"


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
        if not isinstance(self.size, int) or self.size < 1:
            raise CacheError(f"cache image size must be a positive integer, got {self.size!r}")
        if not 0 < self.crop_pct <= 1:
            raise CacheError(f"cache crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise CacheError(f"cache interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.in_chans not in (1, 3):
            raise CacheError(f"cache in_chans must be 1 or 3, got {self.in_chans}")

    @property
    def file_stem(self) -> str:
        crop = "" if self.crop_pct == 1 else f"-crop{self.crop_pct:g}"
        return f"{self.size}px{crop}-{self.interpolation}-{'rgb' if self.in_chans == 3 else 'gray'}"

    def transform(self) -> EvalTransform:
        return EvalTransform(self.size, self.crop_pct, self.interpolation, ToUint8Tensor(self.in_chans))


def fingerprint(folder: ImageFolder) -> str:
    """sha256 over every sample's path (relative to the folder), class, size and modification time:
    any file added, removed, renamed, moved between classes or rewritten changes it."""
    digest = hashlib.sha256()
    for path, target in folder.samples:
        info = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder.root)}\0{target}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorCache:
    """The decoded pixels of one split, memory-mapped, with its class mapping and targets."""

    pixels: np.ndarray  # (N, C, S, S) uint8, memory-mapped read-only
    targets: np.ndarray  # (N,) int64, the folder's class indices
    classes: list[str]
    unreadable: dict[int, str]  # row -> why the image could not be decoded (its row holds zeros)
    paths: Sequence[str]  # the folder's file per row, for reports

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> Batch:
        """Rows ``indices`` as a uint8 batch on ``device``; unreadable images are dropped and reported."""
        keep = np.asarray([i for i in indices if i not in self.unreadable], dtype=np.int64)
        skipped = [SkippedImage(self.paths[i], self.unreadable[i]) for i in indices if i in self.unreadable]
        pixels = torch.from_numpy(self.pixels[keep])  # fancy indexing copies the rows out of the map
        targets = torch.from_numpy(self.targets[keep])
        return Batch(pixels.to(device, non_blocking=True), targets.to(device, non_blocking=True), skipped)


def _paths(directory: Path, split: str, geometry: CacheGeometry) -> tuple[Path, Path]:
    stem = f"{split}-{geometry.file_stem}"
    return directory / f"{stem}.npy", directory / f"{stem}.json"


def open_or_build(
    folder: ImageFolder,
    directory: PathLike,
    split: str,
    geometry: CacheGeometry,
    workers: int = 0,
    log=print,
) -> TensorCache:
    """The cache of ``folder`` under ``directory`` for ``split`` and ``geometry``: opened when it is
    there (after checking it still describes the folder), built (once, atomically) when it is not."""
    if not isinstance(folder, ImageFolder):
        raise CacheError("a tensor cache is built from class folders of images; IDX files are already decoded arrays")
    pixels_path, sidecar_path = _paths(Path(directory), split, geometry)
    expected = _description(folder, split, geometry)
    with _build_lock(pixels_path):  # runs started together share one build: the others wait, then open it
        if not sidecar_path.exists() and not pixels_path.exists():
            log(f"building the {split} tensor cache {printable(pixels_path)} from {printable(folder.source)} (once)")
            try:
                _build(folder, geometry, expected, pixels_path, sidecar_path, workers)
            except OSError as exc:
                message = f"cannot build the tensor cache {printable(pixels_path)}: {exc} (nothing was written)"
                raise CacheError(message) from None
    return _open(folder, pixels_path, sidecar_path, expected)


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


def _description(folder: ImageFolder, split: str, geometry: CacheGeometry) -> dict:
    return dict(
        format=CACHE_FORMAT,
        source=os.path.realpath(folder.root),
        split=split,
        geometry=asdict(geometry),
        classes=list(folder.classes),
        images=len(folder),
        fingerprint=fingerprint(folder),
    )


def _build(
    folder: ImageFolder, geometry: CacheGeometry, description: dict, pixels_path: Path, sidecar_path: Path, workers: int
) -> None:
    shape = (len(folder), geometry.in_chans, geometry.size, geometry.size)
    row_of = {path: row for row, (path, _) in enumerate(folder.samples)}
    unreadable: dict[int, str] = {}
    loader = build_loader(TransformedDataset(folder, geometry.transform()), range(len(folder)), 256, workers)
    with atomic_paths(pixels_path, sidecar_path) as (pixels_tmp, sidecar_tmp):
        pixels = np.lib.format.open_memmap(pixels_tmp, mode="w+", dtype=np.uint8, shape=shape)
        row = 0
        for batch in loader:  # in folder order; skipped images leave their rows at zero
            for image in batch.skipped:
                unreadable[row_of[image.path]] = image.reason
            good = [r for r in range(row, row + len(batch.targets) + len(batch.skipped)) if r not in unreadable]
            pixels[good] = batch.images.numpy()
            row += len(batch.targets) + len(batch.skipped)
        pixels.flush()
        del pixels
        record = dict(description, targets=[int(t) for t in folder.targets], unreadable=unreadable)
        sidecar_tmp.write_text(json.dumps(record) + "\n")


def _open(folder: ImageFolder, pixels_path: Path, sidecar_path: Path, expected: dict) -> TensorCache:
    where = printable(sidecar_path)
    fix = f"delete {printable(pixels_path)} and {where} to rebuild it, or pass another cache directory"
    try:
        record = json.loads(sidecar_path.read_text())
        pixels = np.load(pixels_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CacheError(f"tensor cache {where} cannot be read ({exc}); {fix}") from None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        raise CacheError(f"{where} is not a {CACHE_FORMAT} tensor cache; {fix}")
    for key, problem in (
        ("source", "was built from another folder"),
        ("split", "holds another split"),
        ("geometry", "was built with other settings"),
        ("classes", "has other classes"),
        ("images", "holds another number of images"),
        ("fingerprint", "is stale: files were added, removed or changed since it was built"),
    ):
        if record.get(key) != expected[key]:
            found, wanted = record.get(key), expected[key]
            detail = f" ({found!r:.120} there, {wanted!r:.120} now)" if key != "fingerprint" else ""
            raise CacheError(f"tensor cache {where} {problem}{detail}; {fix}")
    shape = (expected["images"], *(expected["geometry"][k] for k in ("in_chans", "size", "size")))
    targets = np.asarray(record.get("targets", []), dtype=np.int64)
    if pixels.dtype != np.uint8 or pixels.shape != shape or len(targets) != shape[0]:
        found = f"shape {pixels.shape}, expected {shape}"
        raise CacheError(f"tensor cache {printable(pixels_path)} is damaged ({found}); {fix}")
    if not np.array_equal(targets, np.asarray(folder.targets, dtype=np.int64)):
        raise CacheError(f"tensor cache {where} has other class targets than the folder; {fix}")
    unreadable = {int(row): str(reason) for row, reason in record.get("unreadable", {}).items()}
    paths = [path for path, _ in folder.samples]
    return TensorCache(pixels, targets, list(folder.classes), unreadable, paths)
