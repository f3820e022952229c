"""Datasets for training and evaluation: class folders of images, and MNIST-style IDX files.

A data directory is either ``root/train/<class>/*`` + ``root/val/<class>/*`` (decoded with
Pillow; the validation folder may instead be ``validation/`` or ``test/``, as most downloads
ship it), or the four IDX files of MNIST / Fashion-MNIST (``train-images-idx3-ubyte[.gz]``,
``t10k-...`` for validation). Unreadable images never crash an epoch: the sample comes back
as a :class:`SkippedImage` that :func:`collate_skipping` drops and reports.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from selecsls._io import PathLike
from selecsls.data.transforms import seeded_generator
from selecsls.models.validation import MAX_CLASSES, InvalidInput

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "IdxDataset",
    "SkippedImage",
    "TransformedDataset",
    "UnknownClassError",
    "UnreadableImageError",
    "VAL_FOLDERS",
    "balanced_subset",
    "build_dataset",
    "build_loader",
    "collate_skipping",
    "image_files",
    "is_regular_file",
    "open_image",
    "read_idx",
    "to_uint8",
    "training_classes",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = {"train": "train", "val": "t10k"}  # split -> IDX file prefix
#: Folder names of the validation split, in order of preference.
VAL_FOLDERS = ("val", "validation", "test")
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


class UnknownClassError(ValueError):
    """Data (``source``) with classes outside the ones it must be scored against (``unknown`` lists them)."""

    def __init__(self, message: str, source: str, unknown: Sequence[str]) -> None:
        super().__init__(message)
        self.source = source
        self.unknown = list(unknown)


def _class_index(source: str, found: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    """Position of each ``found`` class name in ``classes``; a name not there is an :class:`UnknownClassError`."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise UnknownClassError(
            f"{source!r} has class(es) {unknown} that are not training classes; "
            "remove them or add the same classes to the training split",
            source,
            unknown,
        )
    return {name: index[name] for name in found}


class UnreadableImageError(ValueError):
    """An image file that is missing, corrupt, truncated or not an image."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {os.fspath(path)!r}: {reason}")
        self.path = os.fspath(path)


def is_regular_file(path: PathLike) -> bool:
    """True for a regular file (or a link to one): reading a FIFO or a device could block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_image(path: PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode an image fully (so errors surface here, not later in a transform).

    ``draft_size`` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) whose shorter side
    is still at least ``draft_size`` pixels: far faster for large photos that are then
    downscaled anyway. 16-bit and floating-point images come back as 8-bit images scaled
    to their range (:func:`to_uint8`), not clipped to white or black.
    """
    if not is_regular_file(path):
        raise UnreadableImageError(path, "no such file" if not os.path.lexists(path) else "not a regular file")
    try:
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                return Image.fromarray(to_uint8(np.asarray(image), 16 if image.mode.startswith("I;16") else None))
            return image
    except FileNotFoundError:
        raise UnreadableImageError(path, "no such file") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(path, str(exc) or type(exc).__name__) from None


#: Pillow modes with more than 8 bits per sample (16-bit PNG, 32-bit integer and float TIFF).
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_uint8(pixels: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Pixels of any depth as uint8 over their range: ``bits``-bit integers by their full scale;
    otherwise floats in [0, 1] times 255, values already in [0, 255] as they are, 16-bit ranges by
    65535, and anything else stretched from its minimum to its maximum. One rule for a whole array,
    so an IDX file's images stay comparable to each other."""
    if pixels.dtype == np.uint8:
        return pixels
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if bits is not None:
        scale, offset = 255 / (2**bits - 1), 0.0
    elif np.issubdtype(pixels.dtype, np.floating) and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= 65535 and np.issubdtype(pixels.dtype, np.integer):
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(high - low, 1e-12), low
    return np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- IDX files
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


def _idx_file(root: Path, prefix: str, kind: str) -> Path | None:
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
        if classes is not None:
            index = _class_index(self.source, self.classes, classes)
            targets = np.array([index[name] for name in self.classes], dtype=np.int64)[targets]
            self.classes = list(classes)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, draft_size: int | None = None) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])


# ------------------------------------------------------------------------ class folders
class ImageFolder(Dataset):
    """``root/<class>/<image>`` files; class indices follow ``classes`` (default: sorted folder names).

    Passing the training classes for a validation folder keeps indices aligned and makes a
    validation class the model never saw a clear error rather than silently wrong labels.
    ``label_names`` are the folder names in class-index order.
    """

    def __init__(self, root: PathLike, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {os.fspath(self.root)!r} does not exist")
        folders = _subfolders(self.root)
        if not folders:
            raise ValueError(f"{os.fspath(self.root)!r} has no class folders; expected {self.root}/<class>/<image>")
        self.source = os.fspath(self.root)
        self.classes = list(classes) if classes is not None else folders
        self.label_names = self.classes
        index = _class_index(self.source, folders, self.classes)
        self.samples: list[tuple[str, int]] = []
        owner: dict[str, str] = {}  # real path of every image -> the class folder it was found in
        for name in folders:
            files = []
            for path in image_files(self.root / name):
                real = os.path.realpath(path)
                if real in owner and owner[real] != name:
                    raise ValueError(
                        f"image {real!r} is found under class folders {owner[real]!r} and {name!r} (through a link); "
                        "an image must belong to one class: remove the link or the copy"
                    )
                if real not in owner:  # the same file reached twice within one class counts once
                    owner[real] = name
                    files.append(path)
            if not files:
                raise ValueError(
                    f"class folder {os.fspath(self.root / name)!r} holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            self.samples.extend((f, index[name]) for f in files)
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, draft_size: int | None = None) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return open_image(path, draft_size), target


def image_files(folder: PathLike) -> list[str]:
    """Regular files with an image extension under ``folder``, sorted; links to folders are not
    followed (a link to a parent would loop), FIFOs and devices are skipped (reading them blocks).
    A folder that cannot be listed is an error, not an empty folder."""
    return sorted(
        path
        for dirpath, _, filenames in os.walk(folder, onerror=_unreadable_folder)
        for path in (os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
        if is_regular_file(path)
    )


def _unreadable_folder(error: OSError) -> NoReturn:
    raise ValueError(f"cannot read folder {error.filename!r}: {error.strerror or error}") from None


def _subfolders(root: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except OSError as exc:
        _unreadable_folder(exc)


def training_classes(root: PathLike) -> list[str] | None:
    """Class names in training order for a class-folder layout (``root/train/<class>``), else None.

    Validating against these keeps label indices aligned with the model even when the
    validation split lacks some classes.
    """
    train = Path(root) / "train"
    return _subfolders(train) if train.is_dir() else None


def balanced_subset(targets: Sequence[int], count: int | None, seed: int = 0) -> list[int]:
    """``count`` sample indices spread over the classes as evenly as possible (all when ``count`` is None).

    A seeded shuffle, then round-robin over the classes: the first N files of a sorted folder
    tree are all one class, and a plain random subset skews small N. Sorted, so loading
    follows the file order.
    """
    if count is None or count >= len(targets):
        return list(range(len(targets)))
    if count < 1:
        raise ValueError(f"a subset needs at least 1 image, got {count}")
    shuffled = np.random.default_rng(seed).permutation(len(targets))
    classes = np.asarray(targets)[shuffled]
    by_class = np.argsort(classes, kind="stable")
    rank_in_class = np.empty(len(classes), dtype=np.int64)
    rank_in_class[by_class] = np.arange(len(classes)) - np.searchsorted(classes[by_class], classes[by_class])
    return sorted(shuffled[np.lexsort((classes, rank_in_class))[:count]].tolist())


def build_dataset(root: PathLike, split: str, classes: Sequence[str] | None = None) -> ImageFolder | IdxDataset:
    """The ``split`` ('train' or 'val') of the data directory ``root``, whichever layout it uses.

    The val split is the first of the folders :data:`VAL_FOLDERS` that exists (the dataset's
    ``source`` says which).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {os.fspath(root)!r} does not exist")
    images = _idx_file(root, SPLITS[split], "images-idx3-ubyte")
    labels = _idx_file(root, SPLITS[split], "labels-idx1-ubyte")
    if images and labels:
        if split == "val":
            _refuse_training_data(root, images)
        return IdxDataset(images, labels, classes)
    folders = VAL_FOLDERS if split == "val" else (split,)
    for folder in folders:
        if (root / folder).is_dir():
            if split == "val":
                _refuse_training_data(root, root / folder)
            return ImageFolder(root / folder, classes)
    expected = " or ".join(f"{root}/{folder}/<class>/<image>" for folder in folders)
    raise FileNotFoundError(
        f"no {split} data in {os.fspath(root)!r}: expected {expected} folders "
        f"or IDX files {SPLITS[split]}-images-idx3-ubyte[.gz] and {SPLITS[split]}-labels-idx1-ubyte[.gz]"
    )


def _refuse_training_data(root: Path, validation: Path) -> None:
    """Refuse validation data that is training data (``val/``, or a class folder in it, linked to ``train/``):
    its scores would be training accuracy, a silently wrong result."""
    train_idx = _idx_file(root, SPLITS["train"], "images-idx3-ubyte")
    training = {os.path.realpath(path): path for path in _split_parts(train_idx) + _split_parts(root / "train")}
    for path in _split_parts(validation):
        same = training.get(os.path.realpath(path))
        if same is not None:
            raise ValueError(
                f"validation data {os.fspath(path)!r} is the training data {os.fspath(same)!r} "
                "(through a link): validating on training images would report a wrong accuracy; give the validation "
                "split images of its own (e.g. move a share of the training images there)"
            )


def _split_parts(source: Path | None) -> list[Path]:
    """An IDX file, or a split's folder and its class folders (none if absent)."""
    if source is None or not source.exists():
        return []
    return [source, *(source / name for name in _subfolders(source))] if source.is_dir() else [source]


# ------------------------------------------------------------- transforms and batching
class SkippedImage(NamedTuple):
    """Stands in for a sample whose image could not be read."""

    path: str
    reason: str


@dataclass(frozen=True)
class TransformedDataset(Dataset):
    """Applies ``transform`` to a dataset's images and turns unreadable ones into :class:`SkippedImage`.

    With ``seed`` set, sample ``i`` of epoch ``e`` is augmented with a generator seeded from
    (seed, e, i): augmentation does not depend on worker count, order or resumption.
    """

    base: ImageFolder | IdxDataset
    transform: Callable[..., torch.Tensor]
    seed: int | None = None
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        try:
            image, target = self.base.load(index, getattr(self.transform, "draft_size", None))
        except UnreadableImageError as exc:
            return SkippedImage(exc.path, str(exc))
        if self.seed is None:
            return self.transform(image), target
        return self.transform(image, generator=seeded_generator(self.seed, self.epoch, index)), target


class Batch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor
    skipped: list[SkippedImage]


def collate_skipping(samples: list[Any]) -> Batch:
    """Stack the readable samples; keep the unreadable ones aside for the end-of-epoch report."""
    skipped = [s for s in samples if isinstance(s, SkippedImage)]
    good = [s for s in samples if not isinstance(s, SkippedImage)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images = torch.stack([image for image, _ in good])
    targets = torch.tensor([target for _, target in good], dtype=torch.long)
    return Batch(images, targets, skipped)


def build_loader(
    dataset: TransformedDataset, indices: Sequence[int], batch_size: int, workers: int, drop_last: bool = False
) -> torch.utils.data.DataLoader:
    """A loader over ``indices`` in the given order (the caller owns shuffling and sharding).

    The loader gets its own generator so creating it does not consume the global RNG, which
    a resumed run must find exactly as it was saved.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(indices),
        num_workers=workers,
        collate_fn=collate_skipping,
        drop_last=drop_last,
        generator=torch.Generator(),
    )
