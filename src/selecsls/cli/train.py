"""``selecsls train`` and ``selecsls eval``: train or fine-tune on a data directory, and score a checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from functools import partial

from selecsls._io import atomic_write, check_output, printable
from selecsls.cli import CLIError
from selecsls.train.config import SettingError, TrainConfig

DATA_HELP = next(f.metadata["help"] for f in fields(TrainConfig) if f.name == "data")
ARGUMENT_TYPES = {"int": int, "float": float, "str": str}


def flag(setting: str) -> str:
    """The ``selecsls train`` option of a TrainConfig field: ``img_size`` -> ``--img-size``."""
    return "--" + setting.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with the field's default and help (settings are declared once).

    A field without a default is a required option; a bool is a switch (``--no-NAME`` where it defaults to on).
    """
    for setting in fields(TrainConfig):
        options = dict(setting.metadata)
        if setting.default is MISSING:
            parser.add_argument(flag(setting.name), required=True, **options)
        elif setting.type == "bool":
            action = "store_false" if setting.default else "store_true"
            name = "--no-" + flag(setting.name)[2:] if setting.default else flag(setting.name)
            if setting.default:
                options["help"] = f"turn off: {options['help']}"
            parser.add_argument(name, dest=setting.name, action=action, **options)
        else:
            kind = ARGUMENT_TYPES[setting.type.split(" | ")[0]]
            parser.add_argument(flag(setting.name), type=kind, default=setting.default, **options)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune on a data directory (multi-process: torchrun --nproc_per_node N -m selecsls train)",
    )
    add_config_options(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "eval", help="top-1/top-5, loss and images/s of a model file on the val split of a data directory"
    )
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="FILE",
        help="model file: best.pt, last.pt or one saved by selecsls.save, or an AOTInductor .pt2 package "
        "from selecsls export",
    )
    p.add_argument("--model", help="architecture name when the file holds weights only")
    p.add_argument("--img-size", type=int, help="default: the size the model records (its training size)")
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default: the model's, usually 0.875)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"), help="default: the model's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="score N validation images, class-balanced (the same draw as train --val-limit N)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="score the model as loaded (model.eval()(x)) instead of frozen (selecsls.freeze: BatchNorm folded, "
        "weights packed once; the same outputs within 1e-5, faster on the CPU)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--json-out", metavar="FILE", help="also write the result as JSON to FILE (atomically)")
    p.set_defaults(func=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from selecsls.train.loop import train

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    try:
        train(TrainConfig(**settings))
    except SettingError as exc:
        raise CLIError(exc.spelled(flag)) from exc
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from selecsls.train.evaluation import evaluate_checkpoint, listing

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit}")
    if args.json_out:
        check_output(args.json_out, [args.checkpoint])
    load_model = None  # how evaluate_checkpoint loads the file instead of plainly (train cannot import deploy)
    if args.checkpoint.endswith(".pt2"):  # an AOTInductor package
        from selecsls.deploy.aoti import load_package

        if args.model or args.eager:
            raise CLIError(
                f"{args.checkpoint} is an AOTInductor package, which records its model and runs compiled: "
                "drop --model and --eager (or evaluate the checkpoint it was exported from)"
            )
        load_model = partial(load_package, args.checkpoint)
    elif not args.eager:  # the fast path: BatchNorm folded, weights packed once (selecsls.freeze)
        from selecsls.deploy.freeze import freeze
        from selecsls.models.loading import load

        def load_model():  # one copy of the weights while freezing
            return freeze(load(args.checkpoint, args.model), consume=True)

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
        load_model=load_model,
    )
    if args.json_out:
        with atomic_write(args.json_out, "w") as handle:
            handle.write(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    how = "by name" if result["classes_matched_by"] == "name" else "by position (the model records no class names)"
    print(
        f"val data: {printable(result['val_data'])}; {len(result['classes'])} classes matched {how}: "
        + printable(listing(result["classes"]))
    )
    print(
        f"{result['checkpoint']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"{result['images']} images at {result['img_size']}px, {result['images_per_s']:.1f} images/s"
    )
    if result["skipped"]:
        print(f"skipped {result['skipped']} unreadable image(s), e.g. {result['skipped_examples']}")
    return 0
