"""``selecsls train`` and ``selecsls eval``: train or fine-tune on a data directory, and score a checkpoint."""

from __future__ import annotations

import argparse
import json

DATA_HELP = "data directory: train/<class>/* and val/<class>/* images, or MNIST-style IDX files"


def register(subparsers: argparse._SubParsersAction) -> None:
    from selecsls.train.recipes import RECIPES

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune on a data directory (multi-process: torchrun --nproc_per_node N -m selecsls train)",
    )
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--output", required=True, metavar="DIR", help="where last.pt, best.pt, metrics.jsonl and the curve go"
    )
    p.add_argument("--model", help="variant name (default selecsls42b) or a baseline such as resnet50")
    p.add_argument(
        "--init",
        metavar="CHECKPOINT",
        help="fine-tune from this model file (a new class count re-initialises the classifier)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --output/last.pt")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--in-chans", type=int, default=3, help="input channels of a new model: 3 (grayscale is expanded) or 1"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    recipes = "; ".join(f"{r.name}: {r.description} (lr {r.lr:g}, wd {r.weight_decay:g})" for r in RECIPES.values())
    p.add_argument("--recipe", default="sparsity", choices=sorted(RECIPES), help=recipes)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, help="default: the recipe's")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay (default: the recipe's)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="weight EMA decay, e.g. 0.9998 (0: off); best.pt then holds EMA weights",
    )
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision (fp16 needs CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM")
    p.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter strength")
    p.add_argument("--min-crop-area", type=float, default=0.08, help="smallest random-resized-crop area fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, metavar="N", help="train on the first N training images only (smoke runs)")
    p.add_argument("--val-limit", type=int, metavar="N", help="validate on the first N validation images only")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="also save last.pt every STEPS batches")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (0: load in the main process)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "eval", help="top-1/top-5, loss and images/s of a model file on the val split of a data directory"
    )
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="model file: best.pt, last.pt or one saved by selecsls.save"
    )
    p.add_argument("--model", help="architecture name when the file holds weights only")
    p.add_argument("--img-size", type=int, help="default: the size the model records (its training size)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the model's, usually 0.875)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"), help="default: the model's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, metavar="N", help="score the first N validation images only")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from selecsls.train.loop import TrainConfig, train

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    train(TrainConfig(**settings))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from selecsls.train.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.data,
        args.checkpoint,
        args.model,
        args.img_size,
        args.crop_pct,
        args.interpolation,
        args.batch_size,
        args.workers,
        args.limit,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['checkpoint']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"{result['images']} images at {result['img_size']}px, {result['images_per_s']:.1f} images/s"
    )
    if result["skipped"]:
        print(f"skipped {result['skipped']} unreadable image(s), e.g. {result['skipped_examples']}")
    return 0
