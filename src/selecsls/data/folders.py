"""Class folders of images: ``root/<class>/<image>``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from PIL import Image
from torch.utils.data import Dataset

from selecsls._io import PathLike
from selecsls.data.classes import class_index
from selecsls.data.images import IMAGE_EXTENSIONS, is_regular_file, open_image

__all__ = ["ImageFolder", "image_files", "subfolders", "training_classes"]


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
        folders = subfolders(self.root)
        if not folders:
            raise ValueError(f"{os.fspath(self.root)!r} has no class folders; expected {self.root}/<class>/<image>")
        self.source = os.fspath(self.root)
        self.classes = list(classes) if classes is not None else folders
        self.label_names = self.classes
        index = class_index(self.source, folders, self.classes)
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


def subfolders(root: Path) -> list[str]:
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
    return subfolders(train) if train.is_dir() else None
