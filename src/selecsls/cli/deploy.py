"""``selecsls export`` (ONNX / AOTInductor / OpenVINO / int8, checked) and ``selecsls predict`` (top-k on image
files, or the frame rate of the whole pipeline)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from selecsls._io import atomic_write, check_output
from selecsls.cli import CLIError
from selecsls.deploy.backends import predict_backends

#: Files ``selecsls predict --checkpoint`` runs as exported graphs, by suffix, with the backend that runs them.
EXPORTED_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino", ".pt2": "aoti"}
#: What ``--format`` writes, and the suffix ``--output`` must have where predict tells files apart by it.
EXPORT_SUFFIXES = {"onnx": None, "aoti": ".pt2", "openvino": ".xml"}


def _export_format(text: str) -> str:
    """``--format``; TorchScript, dropped, is named with what replaces it."""
    if text == "torchscript":
        raise argparse.ArgumentTypeError(
            "TorchScript export was dropped (PyTorch deprecates TorchScript): use --format aoti, a .pt2 package "
            "that PyTorch runs without the model's code"
        )
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX, an AOTInductor package (.pt2) or an OpenVINO IR, checked against PyTorch",
        description="Export a model and verify the file: it is run on random inputs (and on --images) and must "
        "match PyTorch within 1e-4 relative (an aoti package: 1e-5), or nothing is written.",
    )
    p.add_argument("checkpoint", help="any checkpoint: selecsls.save / training / pruned files, or a state dict")
    p.add_argument("--model", help="variant name, needed only for a state dict whose shapes fit several variants")
    p.add_argument("--format", type=_export_format, choices=tuple(EXPORT_SUFFIXES), required=True)
    p.add_argument(
        "--output",
        "--out",
        dest="out",
        required=True,
        metavar="FILE",
        help="file to write (atomically, only once the check passed); aoti: NAME.pt2; openvino: NAME.xml, "
        "with NAME.bin beside it",
    )
    p.add_argument("--fuse", action="store_true", help="fold BatchNorm into the convolutions first")
    p.add_argument(
        "--prune",
        type=float,
        metavar="THRESHOLD",
        help="first prune to the fixpoint as selecsls prune --threshold does: channels whose fused filter "
        "norm (|gamma| times the BN-normalised filter norm) is below THRESHOLD, then those nothing reads "
        "(exact; implies --fuse)",
    )
    p.add_argument("--dynamic", action="store_true", help="ONNX, OpenVINO: free batch size, height and width")
    p.add_argument("--img-size", type=int, help="export (and check) at this input size (default: the model's)")
    p.add_argument("--images", nargs="+", default=(), metavar="IMAGE", help="real images to check the export on")
    p.add_argument(
        "--int8",
        action="store_true",
        help="ONNX (ONNX Runtime's quantizer), OpenVINO (NNCF): post-training static int8 quantization "
        "(needs --calibration)",
    )
    p.add_argument(
        "--calibration",
        metavar="DATA",
        help="data directory (class folders or MNIST-style IDX files): its train split calibrates int8, "
        "its val split measures the accuracy drop",
    )
    p.add_argument(
        "--calibration-images", type=int, default=128, help="training images used to calibrate (default 128)"
    )
    p.add_argument("--eval-images", type=int, default=1000, help="validation images scored fp32 vs int8 (default 1000)")
    p.add_argument("--max-drop", type=float, metavar="POINTS", help="fail if int8 loses more top-1 points than this")
    p.add_argument(
        "--json-out",
        metavar="FILE",
        help="also write the checks (and with --int8 the fp32 vs int8 accuracy) as JSON to FILE (atomically)",
    )
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "predict", help="classify images: top-k class names and probabilities (or the pipeline's frames/s)"
    )
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument(
        "--checkpoint",
        help="checkpoint, or a .onnx / OpenVINO .xml / AOTInductor .pt2 file from `selecsls export` "
        "(default: published weights of --model)",
    )
    p.add_argument("--model", help="variant name (with no --checkpoint: its published ImageNet weights)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument(
        "--backend",
        choices=("auto", *predict_backends()),
        default="auto",
        help="inference path; auto runs the model frozen (selecsls.freeze: BN folded, weights packed once; eager "
        "for a network it cannot trace); eager runs model.eval()(x) as loaded",
    )
    p.add_argument(
        "--benchmark",
        metavar="FOLDER",
        help="instead of printing predictions, classify every image under FOLDER one at a time and report "
        "frames/s of decode + preprocess + inference (decoding overlapped with inference)",
    )
    p.add_argument(
        "--decode-threads", type=int, default=1, help="--benchmark: threads decoding images ahead (default 1)"
    )
    p.set_defaults(func=run_predict)


def _check_export_args(args: argparse.Namespace) -> None:
    from selecsls.models.validation import check_img_size, check_int, check_number, check_threshold

    if args.img_size is not None:
        check_img_size(args.img_size)
    if args.prune is not None:
        check_threshold("--prune", args.prune)
    if args.max_drop is not None:
        check_number("--max-drop", args.max_drop, 0.0)
    check_int("--calibration-images", args.calibration_images)
    check_int("--eval-images", args.eval_images)
    if args.int8 and args.format == "aoti":
        raise CLIError("--int8 produces an ONNX model or an OpenVINO IR: use --format onnx or --format openvino")
    if args.int8 and not args.calibration:
        raise CLIError("--int8 needs --calibration DATA: real images to calibrate on and to measure the accuracy drop")
    if args.calibration and not args.int8:
        raise CLIError("--calibration is for --int8 only")
    if args.dynamic and args.format == "aoti":
        raise CLIError("--dynamic applies to ONNX and OpenVINO: an AOTInductor package is compiled for one image size")
    suffix = EXPORT_SUFFIXES[args.format]
    if suffix and not args.out.endswith(suffix):
        written = "NAME.xml and NAME.bin" if args.format == "openvino" else f"a {suffix} package"
        raise CLIError(f"--format {args.format} writes {written}: give --output ending in {suffix}, got {args.out}")
    _require_files(args.images)


def _require_files(images) -> None:
    """Fail on a missing image before spending seconds on loading and exporting the model."""
    for image in images:
        if not Path(image).exists():
            raise FileNotFoundError(f"image {image} does not exist")
        if not Path(image).is_file():
            raise CLIError(f"image {image} is not a regular file")


def _prepare_model(args: argparse.Namespace):
    """The checkpoint's model, pruned and/or fused as asked."""
    from selecsls import fuse, prune
    from selecsls.models.complexity import count_params
    from selecsls.models.loading import load

    model = load(args.checkpoint, args.model).eval()
    if args.prune is not None:
        before = count_params(model)
        model = prune(model, args.prune)
        print(f"pruned at fused filter norm < {args.prune:g}: {before:,} -> {count_params(model):,} parameters")
    elif args.fuse:
        model = fuse(model)
    return model.eval()


def run_export(args: argparse.Namespace) -> int:
    _check_export_args(args)
    check_output(args.out, [args.checkpoint, *args.images])
    if args.json_out:
        check_output(args.json_out, [args.checkpoint, *args.images, args.out])
    from selecsls.data.transforms import eval_transform_for
    from selecsls.deploy.export import export_model
    from selecsls.deploy.inference import load_images

    model = _prepare_model(args)
    card = model.card if args.img_size is None else model.card.with_image_size(args.img_size, args.img_size)
    transform = eval_transform_for(card.preprocessing)
    images = load_images(args.images, transform) if args.images else None
    if images is None:
        print("no --images given: the export is checked on random inputs only")
    if args.int8:
        from selecsls.deploy.quantization import export_int8

        calibration, evaluation = _int8_data(args, model, transform)
        checks, comparison = export_int8(
            model,
            args.out,
            calibration,
            evaluation,
            format=args.format,
            dynamic=args.dynamic,
            images=images,
            max_drop=args.max_drop,
        )
    else:
        checks = export_model(
            model, args.out, args.format, input_size=card.preprocessing.input_size, dynamic=args.dynamic, images=images
        )
    print("fp32 export vs PyTorch:")
    for check in checks:
        print(f"  {check}")
    if args.int8:
        print(f"int8 vs fp32: {comparison}")
    if args.json_out:
        result = {"checks": [asdict(check) for check in checks], "int8": asdict(comparison) if args.int8 else None}
        with atomic_write(args.json_out, "w") as handle:
            handle.write(json.dumps(result, indent=1) + "\n")
    written = f"{args.out} and {Path(args.out).with_suffix('.bin')}" if args.format == "openvino" else args.out
    print(f"wrote {written}")
    return 0


def _int8_data(args: argparse.Namespace, model, transform):
    """(calibration images, validation loader): seeded class-balanced subsets of the data directory.

    Validation labels follow the model's class names, as in ``selecsls eval``.
    """
    import torch

    from selecsls.data.batching import TransformedDataset, balanced_subset, build_loader
    from selecsls.data.datasets import build_dataset
    from selecsls.train.evaluation import VAL_SUBSET_SEED, validation_data

    def loader(dataset, count: int):
        indices = balanced_subset(dataset.targets, count, VAL_SUBSET_SEED)
        return build_loader(TransformedDataset(dataset, transform), indices, batch_size=64, workers=0)

    images = build_dataset(args.calibration, "train", label_gaps=True)  # calibration reads images only
    calibration = torch.cat([batch.images for batch in loader(images, args.calibration_images)])
    return calibration, loader(validation_data(args.calibration, model), args.eval_images)


def run_predict(args: argparse.Namespace) -> int:
    images = _predict_images(args)
    from selecsls.deploy.inference import Predictor

    exported = EXPORTED_SUFFIXES.get(Path(args.checkpoint or "").suffix)
    if exported:
        if args.backend not in ("auto", exported):
            raise CLIError(f"{args.checkpoint} runs on {exported} only; drop --backend {args.backend}")
        predictor = Predictor.from_exported(args.checkpoint)
    else:
        predictor = Predictor.from_model(_predict_model(args), args.backend)
    print(f"backend: {predictor.backend}")
    if args.benchmark:
        print(predictor.benchmark(images, decode_threads=args.decode_threads))
        return 0
    predictions = predictor.predict(images, args.topk)
    for prediction in predictions:
        print(prediction)
    unreadable = [prediction.path for prediction in predictions if prediction.error is not None]
    if unreadable:
        raise CLIError(
            f"{len(unreadable)} of {len(predictions)} image(s) could not be read: {', '.join(unreadable[:5])}"
            + (" ..." if len(unreadable) > 5 else "")
        )
    return 0


def _predict_images(args: argparse.Namespace) -> list[str]:
    """The IMAGE arguments, or with --benchmark every image under its folder; checked before loading a model."""
    if not args.benchmark:
        if not args.images:
            raise CLIError("give at least one IMAGE to classify (or --benchmark FOLDER)")
        if not any(Path(image).is_file() for image in args.images):
            _require_files(args.images)  # nothing to predict: fail before loading the model
        return args.images
    from selecsls.data.folders import image_files
    from selecsls.data.images import IMAGE_EXTENSIONS

    if args.images:
        raise CLIError("--benchmark takes its images from FOLDER: drop the IMAGE arguments")
    if not Path(args.benchmark).is_dir():
        raise FileNotFoundError(f"--benchmark folder {args.benchmark} does not exist")
    images = image_files(args.benchmark)
    if not images:
        raise CLIError(f"--benchmark folder {args.benchmark} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _predict_model(args: argparse.Namespace):
    from selecsls.models.factory import create_model
    from selecsls.models.loading import load

    if args.checkpoint:
        return load(args.checkpoint, args.model)
    if not args.model:
        raise CLIError("give --checkpoint FILE, or --model NAME to use that variant's published ImageNet weights")
    return create_model(args.model, pretrained=True)
