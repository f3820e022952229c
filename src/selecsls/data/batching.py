"""Samples to batches: transformed samples, loaders over given indices, class-balanced subsets.

Unreadable images never crash an epoch: the sample comes back as a :class:`SkippedImage` that
:func:`collate_skipping` drops and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from selecsls.data.folders import ImageFolder
from selecsls.data.idx import IdxDataset
from selecsls.data.images import UnreadableImageError
from selecsls.data.transforms import seeded_generator

__all__ = ["Batch", "SkippedImage", "TransformedDataset", "balanced_subset", "build_loader", "collate_skipping"]


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
