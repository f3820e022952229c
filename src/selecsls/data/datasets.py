"""The split of a data directory, whichever of the two layouts it uses.

A data directory is either ``root/train/<class>/*`` + ``root/val/<class>/*`` (decoded with
Pillow, :mod:`~selecsls.data.folders`; the validation folder may instead be ``validation/`` or
``test/``, as most downloads ship it), or the four IDX files of MNIST / Fashion-MNIST
(``train-images-idx3-ubyte[.gz]``, ``t10k-...`` for validation; :mod:`~selecsls.data.idx`).
Validation data that is the training data is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from selecsls._io import PathLike
from selecsls.data.folders import ImageFolder, subfolders
from selecsls.data.idx import IdxDataset, idx_file

__all__ = ["VAL_FOLDERS", "build_dataset"]

SPLITS = {"train": "train", "val": "t10k"}  # split -> IDX file prefix
#: Folder names of the validation split, in order of preference.
VAL_FOLDERS = ("val", "validation", "test")


def build_dataset(
    root: PathLike, split: str, classes: Sequence[str] | None = None, label_gaps: bool = False
) -> ImageFolder | IdxDataset:
    """The ``split`` ('train' or 'val') of the data directory ``root``, whichever layout it uses.

    The val split is the first of the folders :data:`VAL_FOLDERS` that exists (the dataset's
    ``source`` says which). IDX training labels define the classes: ones that skip class indices are
    refused unless ``label_gaps`` (:meth:`IdxDataset.check_contiguous_labels`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {os.fspath(root)!r} does not exist")
    images = idx_file(root, SPLITS[split], "images-idx3-ubyte")
    labels = idx_file(root, SPLITS[split], "labels-idx1-ubyte")
    if images and labels:
        if split == "val":
            _refuse_training_data(root, images)
        dataset = IdxDataset(images, labels, classes)
        if split == "train" and not label_gaps:
            dataset.check_contiguous_labels()
        return dataset
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
    train_idx = idx_file(root, SPLITS["train"], "images-idx3-ubyte")
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
    return [source, *(source / name for name in subfolders(source))] if source.is_dir() else [source]
