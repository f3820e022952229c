"""Training images/s from image files against the decoded tensor cache, side by side.

Two questions, each timed round-robin in one process (``time_interleaved``, medians):

- data alone, on one thread: images per second each path delivers (files: decode + PIL
  augmentation, the CPU work of one loader worker; cache: rows of the memory map + batched
  augmentation);
- whole training steps (forward, backward, the ``sparsity`` recipe's fused Adam) fed by each path:
  the files through a loader with ``--workers`` processes, as ``selecsls train`` runs, the cache
  in the training process.

    python benchmarks/data_paths.py --data /data/cifar10 --cache /data/cifar10-cache --threads 1 --json data_paths.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch import nn

from selecsls.bench.runner import machine_description, summarize, time_interleaved
from selecsls.data.batch_augment import BatchTrainAugment
from selecsls.data.batching import TransformedDataset, build_loader
from selecsls.data.datasets import build_dataset
from selecsls.data.tensor_cache import CacheGeometry, open_or_build
from selecsls.data.transforms import build_train_transform, seeded_generator
from selecsls.models.factory import create_model
from selecsls.train.recipes import build_optimizer, get_recipe


def file_batches(data, transform, batch: int, workers: int):
    """An endless stream of augmented batches decoded from the image files."""
    order = list(itertools.islice(itertools.cycle(range(len(data))), 200 * batch * 50))
    loader = build_loader(TransformedDataset(data, transform, seed=0), order, batch, workers, drop_last=True)
    return (images for images, _, _ in loader)


def cached_batches(cache, augment: BatchTrainAugment, batch: int):
    """An endless stream of augmented batches from the tensor cache."""
    for step in itertools.count():
        start = step * batch % (len(cache) - batch)
        yield augment(cache.batch(range(start, start + batch)).images, seeded_generator(0, step))


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches, steps: int):
    targets = torch.zeros(0, dtype=torch.long)

    def run() -> None:
        nonlocal targets
        for _ in range(steps):
            images = next(batches)
            if len(targets) != len(images):
                targets = torch.randint(0, 10, (len(images),))
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="class folders: DATA/train/<class>/*")
    parser.add_argument("--cache", required=True, type=Path, help="tensor cache directory (built if absent)")
    parser.add_argument("--model", default="selecsls42b")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader processes of the file path in training")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training steps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    data = build_dataset(args.data, "train")
    transform = build_train_transform(args.img_size, scale=(0.35, 1.0))
    cache = open_or_build(data, args.cache, "train", CacheGeometry(args.img_size), workers=args.workers)
    augment = BatchTrainAugment(transform)

    data_only = {
        "files (decode + PIL, per image)": file_batches(data, transform, args.batch, 0),
        "tensor cache (batched)": cached_batches(cache, augment, args.batch),
    }
    torch.set_num_threads(1)  # the data work of one core, as in one loader worker
    data_samples = time_interleaved({name: (lambda s=s: next(s)) for name, s in data_only.items()}, 3, 50)
    torch.set_num_threads(args.threads)

    model = create_model(args.model, num_classes=len(data.classes)).train()
    optimizer = build_optimizer(model, get_recipe("sparsity"), 1e-3, 5e-4)
    streams = {
        f"files, {args.workers} loader worker(s)": file_batches(data, transform, args.batch, args.workers),
        "tensor cache": cached_batches(cache, augment, args.batch),
    }
    steps = {name: training_step(model, optimizer, stream, args.steps) for name, stream in streams.items()}
    step_samples = time_interleaved(steps, 1, args.repeats)

    result = dict(
        settings=vars(args) | {"cache": str(args.cache), "json": None},
        machine=machine_description("cpu"),
        data_only={
            name: dict(summarize(s), images_per_s=args.batch / summarize(s)["median"])
            for name, s in data_samples.items()
        },
        training={
            name: dict(summarize(s), images_per_s=args.batch * args.steps / summarize(s)["median"])
            for name, s in step_samples.items()
        },
    )
    for section in ("data_only", "training"):
        print(f"\n{section}:")
        for name, figures in result[section].items():
            print(f"  {name:40s} {figures['images_per_s']:10.1f} images/s  (median of {figures['n']})")
        names = list(result[section])
        ratio = result[section][names[1]]["images_per_s"] / result[section][names[0]]["images_per_s"]
        print(f"  cache / files: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
