"""Tiny datasets and models for the data, training and evaluation tests."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from selecsls import ModelSpec, get_spec

# Subprocesses (kill -9, torchrun, real-data runs) use one thread: results and times then do not
# depend on how many other jobs share the CPU's cores.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# One clearly different colour per class, so even a few training steps can separate them.
CLASS_COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 220)}


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (40, 36)) -> Path:
    """A noisy solid-colour image (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_image_folder(root: Path, per_class: int = 4, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """root/<split>/<class>/<n>.jpg for every class in CLASS_COLOURS."""
    for s, split in enumerate(splits):
        for c, (name, colour) in enumerate(CLASS_COLOURS.items()):
            for i in range(per_class):
                suffix = ".png" if i % 2 else ".jpg"
                write_image(root / split / name / f"{i}{suffix}", colour, seed=1000 * s + 100 * c + i)
    return root


def corrupt_image(path: Path) -> Path:
    """Truncate an image file so it fails to decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def narrow_spec(divisor: int = 8) -> ModelSpec:
    """selecsls42b with every conv ``divisor`` times narrower: same topology, a fraction of the compute."""
    spec = get_spec("selecsls42b")
    return spec.with_widths(
        {layer: max(2, out // divisor) for layer, _, out, _ in spec.conv_layers()}, name="narrow42b"
    )


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An MNIST-style IDX file of unsigned bytes (gzip-compressed if asked)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


#: Names a CIFAR-10 already unpacked on the user's machine: the tests read it in place instead of the archive.
CIFAR10_ENV = "SELECSLS_CIFAR10"


def unpacked_cifar10(folder: str) -> Path:
    """The folder ``SELECSLS_CIFAR10`` names, if it has the layout (ValueError naming the fix otherwise)."""
    from selecsls.data.datasets import VAL_FOLDERS

    root = Path(folder)
    if not (root / "train").is_dir() or not any((root / name).is_dir() for name in VAL_FOLDERS):
        raise ValueError(
            f"{CIFAR10_ENV}={folder} is not an unpacked CIFAR-10: expected {root}/train/<class>/ and "
            f"{root}/val/<class>/ (or {', '.join(VAL_FOLDERS[1:])} instead of val); fix or unset it"
        )
    return root
