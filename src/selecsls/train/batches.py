"""Where a run's batches come from: image files or the decoded tensor cache.

:class:`FileBatches` decodes and augments every image in loader worker processes, per sample
(seeded by seed, epoch, index). :class:`CachedBatches` reads uint8 rows of the tensor caches
(:mod:`selecsls.data.tensor_cache`, built on first use) and augments whole batches on the
training device (seeded by seed, epoch, step, process). Both yield
:class:`~selecsls.data.batching.Batch` tuples over the same indices, so the loop, resumption
and validation subsets are the same for either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from selecsls.data.batch_augment import BatchTrainAugment
from selecsls.data.batching import Batch, TransformedDataset, build_loader
from selecsls.data.folders import ImageFolder
from selecsls.data.idx import IdxDataset
from selecsls.data.tensor_cache import CacheError, CacheGeometry, TensorCache, open_or_build
from selecsls.data.transforms import EvalTransform, TrainTransform, seeded_generator
from selecsls.train.config import SettingError, TrainConfig
from selecsls.train.distributed import Workers

__all__ = ["CachedBatches", "FileBatches", "build_batches"]


class FileBatches:
    """Images decoded and augmented per sample by the loader's worker processes."""

    def __init__(
        self,
        train_data: ImageFolder | IdxDataset,
        val_data: ImageFolder | IdxDataset,
        train_transform: TrainTransform,
        eval_transform: EvalTransform,
        config: TrainConfig,
    ) -> None:
        self.train_data, self.val_data = train_data, val_data
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.config = config

    def train_epoch(self, epoch: int, order: Sequence[int], first_step: int, rank: int) -> Iterator[Batch]:
        dataset = TransformedDataset(self.train_data, self.train_transform, self.config.seed, epoch)
        return iter(build_loader(dataset, order, self.config.batch_size, self.config.workers, drop_last=True))

    def validation(self, indices: Sequence[int]) -> Iterable[Batch]:
        dataset = TransformedDataset(self.val_data, self.eval_transform)
        return build_loader(dataset, indices, self.config.batch_size, self.config.workers)


class CachedBatches:
    """uint8 rows of the tensor caches, augmented (training) or normalised (validation) on ``device``."""

    def __init__(
        self,
        train: TensorCache,
        val: TensorCache,
        train_transform: TrainTransform,
        eval_transform: EvalTransform,
        config: TrainConfig,
        device: torch.device,
    ) -> None:
        self.train, self.val = train, val
        self.augment = BatchTrainAugment(train_transform)
        self.normalize = eval_transform.to_tensor.normalize
        self.config, self.device = config, device

    def train_epoch(self, epoch: int, order: Sequence[int], first_step: int, rank: int) -> Iterator[Batch]:
        size = self.config.batch_size
        for step, start in enumerate(range(0, len(order) - size + 1, size), start=first_step):
            images, targets, skipped = self.train.batch(order[start : start + size], self.device)
            generator = seeded_generator(self.config.seed, epoch, step, rank)
            yield Batch(self.augment(images, generator) if len(images) else images, targets, skipped)

    def validation(self, indices: Sequence[int]) -> Iterator[Batch]:
        size = self.config.batch_size
        for start in range(0, len(indices), size):
            images, targets, skipped = self.val.batch(indices[start : start + size], self.device)
            yield Batch(self.normalize(images), targets, skipped)


def build_batches(
    config: TrainConfig,
    train_data: ImageFolder | IdxDataset,
    val_data: ImageFolder | IdxDataset,
    train_transform: TrainTransform,
    eval_transform: EvalTransform,
    workers: Workers,
    log: Callable[[str], None],
    samples: dict[str, Sequence[int]] | None = None,
) -> FileBatches | CachedBatches:
    """The run's batch source: the tensor caches in ``config.data_cache`` (built by the main
    process on first use while the others wait; of the ``samples`` a split's batches draw from,
    default all), else the image files."""
    if not config.data_cache:
        return FileBatches(train_data, val_data, train_transform, eval_transform, config)
    if not isinstance(train_data, ImageFolder) or not isinstance(val_data, ImageFolder):
        raise SettingError("{data_cache} caches class folders of images; IDX files are already decoded: drop it")
    in_chans = len(eval_transform.to_tensor.normalize.mean)
    geometries = {
        "train": CacheGeometry(train_transform.img_size, 1.0, train_transform.interpolation, in_chans),
        "val": CacheGeometry(eval_transform.img_size, eval_transform.crop_pct, eval_transform.interpolation, in_chans),
    }
    folders = {"train": train_data, "val": val_data}
    samples = samples or {}

    def open_caches() -> dict[str, TensorCache]:
        try:
            return {
                split: open_or_build(
                    folders[split], config.data_cache, split, geometry, config.workers, log, samples.get(split)
                )
                for split, geometry in geometries.items()
            }
        except CacheError as exc:
            raise SettingError(f"{{data_cache}}: {exc}") from None

    caches, error = None, None
    if workers.is_main:  # the other processes wait (in all_agree) until the main one has built the caches
        try:
            caches = open_caches()
        except SettingError as exc:
            error = exc
    if not workers.all_agree(error is None):
        raise error or SettingError("{data_cache}: the main process could not open the tensor caches (see its log)")
    caches = caches or open_caches()
    return CachedBatches(caches["train"], caches["val"], train_transform, eval_transform, config, workers.device)
