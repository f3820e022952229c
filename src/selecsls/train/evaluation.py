"""Validation as ImageNet papers report it: top-1, top-5, mean loss, throughput.

:func:`evaluate` works in a single process or sharded across a torch.distributed group
(each process scores its share; counts are summed), so training reuses it unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from selecsls._io import printable
from selecsls.data.batching import TransformedDataset, balanced_subset, build_loader
from selecsls.data.classes import UnknownClassError
from selecsls.data.datasets import build_dataset
from selecsls.data.folders import ImageFolder, training_classes
from selecsls.data.idx import IdxDataset
from selecsls.data.transforms import eval_transform_for
from selecsls.models.compare import check_finite_outputs
from selecsls.models.validation import check_crop_pct, check_img_size, check_int
from selecsls.train.reporting import progress_bar

__all__ = ["VAL_SUBSET_SEED", "evaluate", "evaluate_checkpoint", "listing", "topk_correct", "validation_data"]

#: Seed of the ``--limit`` / ``--val-limit`` validation subsets: fixed, so every run and
#: ``selecsls eval --limit N`` score the same images whatever the training seed.
VAL_SUBSET_SEED = 0


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """How many targets are among the ``k`` highest logits, for each ``k`` (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def autocast_for(device: torch.device, amp: str):
    """The autocast context for ``amp`` ('off', 'bf16' or 'fp16'; fp16 needs CUDA)."""
    if amp == "off":
        return nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device | str = "cpu",
    amp: str = "off",
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """top1/top5 (%), mean cross-entropy, image count, images/s and skipped (unreadable) images."""
    device = torch.device(device)
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # top1 hits, top5 hits, loss sum, images, skipped, sum of |logits|
    skipped_paths: list[str] = []
    batches = loader
    if progress:
        batches = progress_bar(iterable=loader, desc="eval", unit="batch", leave=False)
    start = time.perf_counter()
    for images, targets, skipped in batches:
        sums[4] += len(skipped)
        skipped_paths.extend(s.path for s in skipped)
        if len(targets) == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images).float()
        logits = logits.cpu()
        top1, top5 = topk_correct(logits, targets, (1, 5))
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        magnitude = float(logits.double().abs().sum())
        sums += torch.tensor([top1, top5, float(loss), len(targets), 0, magnitude], dtype=torch.float64)
    elapsed = time.perf_counter() - start
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    # The summed |logits| is finite exactly when every output was: checked after the sum, so every process of a
    # sharded evaluation refuses alike (one refusing alone would leave the others waiting in all_reduce).
    check_finite_outputs(sums, "the validation images")
    top1, top5, loss_sum, count, skipped_count, _ = sums.tolist()
    if count == 0:
        raise ValueError("no readable validation images: every image was skipped as unreadable")
    return dict(
        top1=100.0 * top1 / count,
        top5=100.0 * top5 / count,
        loss=loss_sum / count,
        images=int(count),
        images_per_s=count / elapsed,
        skipped=int(skipped_count),
        skipped_examples=skipped_paths[:5],
    )


def listing(names: Sequence[str], shown: int = 20) -> str:
    """Class names for a message: the first ``shown``, then how many in all."""
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def validation_data(data: str | os.PathLike, model: nn.Module) -> ImageFolder | IdxDataset:
    """The val split of ``data``, labelled with ``model``'s output indices.

    A model that records its class names (``model.card.label_names``, as training
    does) is matched by name: a val tree with fewer classes, or in another order, still
    scores correctly, and a class the model does not know is an error. Without names,
    classes follow the sorted training folders (or the data's own order), by position.
    """
    model.card.require_outputs("scoring on labelled images")
    names = model.card.label_names
    if names is None:
        dataset = build_dataset(data, "val", classes=training_classes(data))
        num_classes = getattr(model, "num_classes", None)
        if num_classes is not None and len(dataset.classes) > num_classes:
            raise ValueError(
                f"{os.fspath(data)!r} has {len(dataset.classes)} classes but the model predicts {num_classes}; "
                "evaluate on the data it was trained for"
            )
        return dataset
    try:
        return build_dataset(data, "val", classes=names)
    except UnknownClassError as exc:
        raise UnknownClassError(
            f"{exc.source!r} has class(es) {exc.unknown} that the model does not know (it predicts {listing(names)}); "
            "remove them or evaluate a model trained on them",
            exc.source,
            exc.unknown,
        ) from None


def evaluate_checkpoint(
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    load_model: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Score a saved model (dense, pruned or a training checkpoint) on the val split of ``data``.

    Preprocessing defaults to what the model's card records (training stores
    its image size there); the arguments override it. Classes are matched as
    :func:`validation_data` says; ``limit`` scores a class-balanced subset (seed
    :data:`VAL_SUBSET_SEED`, the one training validates on). ``load_model`` loads the model
    ``checkpoint`` holds when a higher layer knows better (an AOTInductor package, ``.pt2``; the frozen
    model): called once the arguments are checked, as loading the file is.
    """
    from selecsls.models.loading import load

    if img_size is not None:
        check_img_size(img_size, "--img-size", batch_size)
    if crop_pct is not None:
        check_crop_pct("--crop-pct", crop_pct)
    check_int("--batch-size", batch_size)
    check_int("--workers", workers, low=0)
    if limit is not None:
        check_int("--limit", limit)
    model = load(checkpoint, model_name) if load_model is None else load_model()
    transform = eval_transform_for(model.card.preprocessing, img_size, crop_pct, interpolation)
    if img_size is None:  # the size the file records meets --img-size's limits, memory at this batch included
        check_img_size(transform.img_size, f"the input size {printable(os.fspath(checkpoint))} records", batch_size)
    dataset = validation_data(data, model)
    indices = balanced_subset(dataset.targets, limit, VAL_SUBSET_SEED)
    loader = build_loader(TransformedDataset(dataset, transform), indices, batch_size, workers)
    result = evaluate(model, loader, progress=True)
    return dict(
        checkpoint=os.fspath(checkpoint),
        val_data=dataset.source,
        classes=[dataset.classes[target] for target in sorted({int(dataset.targets[i]) for i in indices})],
        classes_matched_by="name" if model.card.label_names is not None else "position",
        img_size=transform.img_size,
        crop_pct=transform.crop_pct,
        interpolation=transform.interpolation,
        **result,
    )
