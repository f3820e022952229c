"""MNIST-style IDX files: the array format, and a labelled pair of them as a dataset."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from selecsls._io import PathLike
from selecsls.data.classes import class_index, image_count
from selecsls.data.images import to_uint8
from selecsls.models.validation import MAX_CLASSES, InvalidInput

__all__ = ["IdxDataset", "idx_file", "read_idx"]

#: Fashion-MNIST's class names (IDX files carry none), for label arrays whose sha256 is one of these.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_LABELS_SHA256 = {
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",  # train-labels-idx1-ubyte
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",  # t10k-labels-idx1-ubyte
}


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed or not, as a numpy array."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {os.fspath(path)!r}: {exc}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{os.fspath(path)!r} is not an IDX file (bad magic number)")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(
            f"IDX file {os.fspath(path)!r} is truncated: its header declares {ndim} dimensions "
            f"({header} bytes) but the file holds {len(data)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python integers: 200 dimensions cannot overflow
    body = data[header:]
    if len(body) != expected:
        raise ValueError(
            f"IDX file {os.fspath(path)!r} is truncated or padded: header says {shape} "
            f"({expected} bytes) but it holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz"):
        if (root / name).is_file():
            return root / name
    return None


class IdxDataset(Dataset):
    """Images and labels from a pair of IDX files; samples are grayscale PIL images.

    IDX files name no classes: ``label_names`` is None (classes are ``'0'``, ``'1'``, ...)
    unless the labels are recognisably Fashion-MNIST's. ``classes`` re-indexes the labels
    by name, as for :class:`ImageFolder`.

    Images of any IDX type are scaled to 8 bits (:func:`to_uint8`); labels must be class indices
    (non-negative integers).
    """

    def __init__(self, images_path: PathLike, labels_path: PathLike, classes: Sequence[str] | None = None) -> None:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or not len(labels):
            raise ValueError(
                f"IDX pair {os.fspath(images_path)!r} / {os.fspath(labels_path)!r} does not match: "
                f"expected N > 0 images (N, H, W) and N labels, got {images.shape} and {labels.shape}"
            )
        if min(images.shape[1:]) < 1:
            raise ValueError(
                f"IDX images {os.fspath(images_path)!r} are {images.shape[1]}x{images.shape[2]} pixels: no pixels to "
                "learn from"
            )
        if not np.all(np.isfinite(labels)) or np.any(labels < 0) or np.any(labels != np.round(labels)):
            raise ValueError(f"IDX labels {os.fspath(labels_path)!r} must be non-negative integers (class indices)")
        if labels.max() >= MAX_CLASSES:  # checked before a name is made for each class up to it
            raise InvalidInput(
                f"IDX labels {os.fspath(labels_path)!r} hold class index {int(labels.max())}; at most "
                f"{MAX_CLASSES:,} classes are supported (indices 0 to {MAX_CLASSES - 1})"
            )
        self.source = os.fspath(images_path)
        self.images = to_uint8(images)
        targets = labels.astype(np.int64)
        known = hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest() in FASHION_MNIST_LABELS_SHA256
        self.label_names = list(FASHION_MNIST_CLASSES) if known else None
        self.classes = self.label_names or [str(c) for c in range(int(targets.max()) + 1)]
        self.labels_source = os.fspath(labels_path)
        if classes is not None:  # only the labels that occur are looked up: a stray one is named alone
            present, counts = np.unique(targets, return_counts=True)
            names = [self.classes[label] for label in present]
            index = class_index(self.labels_source, names, classes, counts.tolist())
            lookup = np.zeros(len(self.classes), dtype=np.int64)
            lookup[present] = [index[name] for name in names]
            targets = lookup[targets]
            self.classes = list(classes)
        self.targets = targets

    def check_contiguous_labels(self) -> None:
        """Refuse labels that skip class indices (0-9 and a stray 255): each skipped index would become a
        class without images, and the stray label a class of its own."""
        present, counts = np.unique(self.targets, return_counts=True)
        if len(present) == present[-1] + 1:
            return
        first_missing = int(np.flatnonzero(present != np.arange(len(present)))[0])
        beyond = [f"label {label} ({image_count(n)})" for label, n in zip(present, counts) if label > first_missing]
        skipped = int(present[first_missing]) - 1
        gap = f"{first_missing}" if skipped == first_missing else f"{first_missing}-{skipped}"
        more = f" and {len(beyond) - 5} more" if len(beyond) > 5 else ""
        raise ValueError(
            f"IDX labels {self.labels_source!r} skip class indices {gap} before {', '.join(beyond[:5])}{more}: "
            f"training on them makes {int(present[-1]) + 1 - len(present)} classes without images (stray labels?); "
            "correct those labels, or accept the gaps (selecsls train --label-gaps; build_dataset(..., "
            f"label_gaps=True)) to train every index up to {int(present[-1])} as a class"
        )

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, draft_size: int | None = None) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])
