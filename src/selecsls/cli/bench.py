"""``selecsls bench``: SelecSLS against ResNet-50 (and VoVNet-39) on this machine, fairly."""

from __future__ import annotations

import argparse
import sys

from selecsls._io import check_output
from selecsls.deploy.backends import BACKENDS, device_backends

#: What ``--process-memory`` accepts (``selecsls.bench.memory.PROCESS_ENGINES``; named here so the
#: parser imports no torch).
PROCESS_ENGINES = ("eager", "frozen", "onnxruntime", "openvino")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 224,512, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _size_list(text: str) -> tuple[tuple[int, int], ...]:
    """'224,512x320' -> ((224, 224), (320, 512)): a side for square images, else WIDTHxHEIGHT."""
    from selecsls.bench.runner import parse_size

    try:
        sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes such as 224,512x320 (WIDTHxHEIGHT), got {text!r}"
        ) from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return tuple(sizes)


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="latency, memory and MACs of SelecSLS vs ResNet-50 and VoVNet-39, as ratios to ResNet-50",
        description=(
            "Quick default (a few minutes on 2 CPU cores): selecsls42b, selecsls60, resnet50, vovnet39 at "
            "224px and 512px batch 1 and 224px batch 16, eager and frozen (selecsls.freeze; CPU), fp32. Models "
            "are timed round-robin so machine drift hits all alike; medians and inter-quartile ranges are reported."
        ),
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--full", action="store_true", help="the published grid: 224/400/512 px x batch 1/16")
    preset.add_argument(
        "--realtime",
        action="store_true",
        help="batch 1 at 224x224, 512x320 (the XNect video frame) and 512x512 on every backend available on "
        "--device, with a best-vs-best table (each model's fastest backend vs resnet50's fastest)",
    )
    p.add_argument(
        "--models",
        type=_name_list,
        help="comma-separated SelecSLS variants, baselines (resnet50, vovnet39) or model files (.pt, .pth, "
        ".safetensors: a trained or pruned network, timed as saved; .pt2: an AOTInductor package from "
        "selecsls export, timed as compiled, in the eager row at its one size)",
    )
    p.add_argument(
        "--sizes",
        type=_size_list,
        default=(),
        help="image sizes: a side for square images, WIDTHxHEIGHT otherwise, e.g. 224,512x320 "
        "(a grid with --batch-sizes)",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=(), help="batch sizes, e.g. 1,16")
    p.add_argument(
        "--memory-sizes",
        type=_size_list,
        help="image sizes of the batch-1 inference memory measures (CPU: peak RSS growth and live tensor peak "
        "of one steady call; default 224,512x320)",
    )
    p.add_argument(
        "--backends",
        type=_name_list,
        help="comma-separated: " + ", ".join(BACKENDS) + " (default eager and, on the CPU, frozen; with --realtime "
        "every one that can run). eager, plain model.eval()(x), is always timed and reported first, frozen "
        "(selecsls.freeze) next on the CPU",
    )
    p.add_argument(
        "--process-memory",
        type=_name_list,
        metavar="ENGINES",
        help="CPU: engines whose whole-process memory (peak while loading, peak over 3 calls, steady) is measured, "
        "one fresh process each, at the first --memory-sizes size: " + ", ".join(PROCESS_ENGINES) + " or none "
        "(default: eager and frozen, and onnxruntime / openvino when among --backends)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, printed)")
    p.add_argument("--amp", action="store_true", help="autocast: fp16 on CUDA, bf16 on CPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds (default 7)")
    p.add_argument(
        "--output",
        default="bench",
        metavar="PREFIX",
        help="writes PREFIX.json (every raw sample, the machine) and PREFIX.png (default: bench)",
    )
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from selecsls.bench.report import format_report, write_json, write_plot
    from selecsls.bench.runner import INFERENCE_MEMORY_SHAPES, QUICK_MODELS, BenchSettings, grid_shapes, run_benchmark

    for suffix in (".json", ".png"):
        check_output(f"{args.output}{suffix}")
    preset = "full" if args.full else "realtime" if args.realtime else "quick"
    backends = args.backends or (tuple(device_backends(args.device)) if args.realtime else ())
    # What a newcomer's model(x) gives comes first, then (CPU) the frozen model predict and eval run;
    # every speed-up is against resnet50's eager run.
    first = ("eager", "frozen") if args.device == "cpu" else ("eager",)
    backends = (*first, *(name for name in backends if name not in first))
    if args.process_memory is None:
        engines = tuple(e for e in PROCESS_ENGINES if e in backends) if args.device == "cpu" else ()
    else:
        engines = () if args.process_memory == ("none",) else args.process_memory
    memory_shapes = tuple((1, *size) for size in args.memory_sizes) if args.memory_sizes else INFERENCE_MEMORY_SHAPES
    settings = BenchSettings(
        models=QUICK_MODELS if args.models is None else args.models,
        shapes=grid_shapes(preset, args.sizes, args.batch_sizes),
        backends=backends,
        device=args.device,
        threads=args.threads,
        amp=args.amp,
        warmup=args.warmup,
        repeats=args.repeats,
        inference_memory_shapes=memory_shapes,
        process_memory_engines=engines,
    )
    result = run_benchmark(settings, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_report(result))
    write_json(result, f"{args.output}.json")
    write_plot(result, f"{args.output}.png")
    print(f"\nwrote {args.output}.json and {args.output}.png")
    return 0
