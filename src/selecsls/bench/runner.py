"""Fair side-by-side benchmarks: interleaved timing, robust summaries, the model x size grid, best vs best.

Timings on a shared machine drift (other processes, clock boosts, thermal limits). Measuring
models round-robin, one call each per round, exposes every model to the same drift, and the
median with its inter-quartile range is robust to the odd slow call.

Shapes are (batch, height, width). The ``realtime`` preset is what SelecSLS is for (XNect: one
512x320 video frame at a time): batch 1 at 224x224, 512x320 and 512x512 on every backend that
can run on the device, and :func:`best_vs_best` compares each model's fastest backend with the
reference's fastest, per precision.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from selecsls._timing import Clock, time_interleaved, wall_clock
from selecsls.bench.memory import (
    PROCESS_ENGINES,
    MemoryUnavailable,
    cuda_training_peak_bytes,
    inference_memory_bytes,
    process_memory_bytes,
    saved_tensor_bytes,
)
from selecsls.bench.reliability import load_average
from selecsls.deploy.aoti import PackagedModel, load_package
from selecsls.deploy.backends import BACKENDS, BackendUnavailable, predict_backends
from selecsls.models.complexity import count_macs, count_params
from selecsls.models.factory import create_model, list_models
from selecsls.models.files import MODEL_FILE_SUFFIXES
from selecsls.models.loading import load
from selecsls.models.validation import check_img_size

__all__ = [
    "BackendUnavailable",
    "BenchSettings",
    "best_vs_best",
    "cuda_event_clock",
    "grid_shapes",
    "parse_size",
    "run_benchmark",
    "shape_key",
    "size_label",
    "summarize",
    "time_interleaved",
    "wall_clock",
]

REFERENCE_MODEL = "resnet50"
QUICK_MODELS = ("selecsls42b", "selecsls60", "resnet50", "vovnet39")
# (batch, height, width): the published claims at a small and a large image, and at a large batch.
QUICK_SHAPES = ((1, 224, 224), (1, 512, 512), (16, 224, 224))
FULL_SIZES = ((224, 224), (400, 400), (512, 512))
FULL_BATCH_SIZES = (1, 16)
# Real time: one frame at a time; 512x320 (width x height) is XNect's video frame.
REALTIME_SHAPES = ((1, 224, 224), (1, 320, 512), (1, 512, 512))
PRESETS = {
    "quick": QUICK_SHAPES,
    "full": tuple((batch, *size) for batch in FULL_BATCH_SIZES for size in FULL_SIZES),
    "realtime": REALTIME_SHAPES,
}
# Saved activations are counted on the meta device (free), at a small and a large training load.
MEMORY_SHAPES = ((1, 224, 224), (8, 512, 512))
# Inference memory (RSS growth, live tensor peak) where the published batch-1 claim applies.
INFERENCE_MEMORY_SHAPES = ((1, 224, 224), (1, 320, 512))
#: A ``--models`` entry ending so is an AOTInductor package (``selecsls export --format aoti``), timed as compiled.
PACKAGE_SUFFIX = ".pt2"


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """median, q1, q3, iqr (linear interpolation between samples), min and n of ``samples``."""
    if len(samples) == 0:
        raise ValueError("summarize needs at least one sample")
    q1, median, q3 = (float(v) for v in np.percentile(np.asarray(samples, dtype=float), [25, 50, 75]))
    return dict(median=median, q1=q1, q3=q3, iqr=q3 - q1, min=float(min(samples)), n=len(samples))


def cuda_event_clock() -> Clock:
    """A clock timing one call with CUDA events, recorded after the queue has drained."""

    def measure(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return measure


def grid_shapes(
    preset: str = "quick", sizes: Sequence[tuple[int, int]] = (), batch_sizes: Sequence[int] = ()
) -> tuple[tuple[int, int, int], ...]:
    """(batch, height, width) cells to time: a preset's (:data:`PRESETS`); ``sizes`` ((height, width)
    pairs) or ``batch_sizes`` replace that axis and make the grid every size with every batch size."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    shapes = PRESETS[preset]
    if not (sizes or batch_sizes):
        return shapes
    sizes = tuple(sizes) or tuple(dict.fromkeys((height, width) for _, height, width in shapes))
    batch_sizes = tuple(batch_sizes) or tuple(sorted({batch for batch, _, _ in shapes}))
    return tuple((batch, height, width) for batch in batch_sizes for height, width in sizes)


def parse_size(text: str) -> tuple[int, int]:
    """'224' (a square side) or WIDTHxHEIGHT ('512x320', as :func:`size_label` writes it) -> (height, width);
    ValueError for anything else."""
    width, _, height = text.strip().partition("x")
    return int(height or width), int(width)


def size_label(height: int, width: int) -> str:
    """'224' for a square image, else WIDTHxHEIGHT as video formats are named: '512x320'."""
    return f"{height}" if height == width else f"{width}x{height}"


def shape_key(batch: int, height: int, width: int) -> str:
    """JSON key of a (batch, height, width) cell: '1x224', or '1x512x320' (batch, width, height)."""
    return f"{batch}x{size_label(height, width)}"


@dataclass(frozen=True)
class BenchSettings:
    """What to measure. ``shapes`` are (batch, height, width) cells; ``threads`` None keeps torch's default."""

    models: tuple[str, ...] = QUICK_MODELS
    shapes: tuple[tuple[int, int, int], ...] = QUICK_SHAPES
    backends: tuple[str, ...] = ("eager",)
    device: str = "cpu"
    threads: int | None = None
    amp: bool = False
    warmup: int = 1
    repeats: int = 7
    memory_shapes: tuple[tuple[int, int, int], ...] = field(default=MEMORY_SHAPES)
    inference_memory_shapes: tuple[tuple[int, int, int], ...] = field(default=INFERENCE_MEMORY_SHAPES)
    #: Engines whose whole-process memory is measured (CPU, at the first inference memory shape; none: skipped).
    process_memory_engines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        known = list_models(baselines=True)
        unknown = [m for m in self.models if m not in known and not is_model_file(m)]
        if unknown or not self.models:
            raise ValueError(
                f"unknown or no models {unknown}; choose from {', '.join(known)}, or name model files "
                f"({', '.join((*MODEL_FILE_SUFFIXES, PACKAGE_SUFFIX))})"
            )
        missing = [m for m in self.models if is_model_file(m) and not os.path.isfile(m)]
        if missing:
            raise ValueError(f"model file(s) {missing} do not exist")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"unknown or no backends {unknown}; choose from {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available in this PyTorch build or machine; use --device cpu")
        cells = self.shapes + self.memory_shapes + self.inference_memory_shapes
        bad = [cell for cell in cells if len(cell) != 3 or min(cell) < 1]
        if bad or not self.shapes:
            raise ValueError(f"shapes must be positive (batch, height, width), got {bad or 'none'}")
        for batch, height, width in self.shapes:
            for side in {height, width}:
                check_img_size(side, "image size", batch, batch_name="--batch-sizes")
        unknown = [e for e in self.process_memory_engines if e not in PROCESS_ENGINES]
        if unknown:
            raise ValueError(f"unknown process memory engines {unknown}; choose from {', '.join(PROCESS_ENGINES)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")


def machine_description(device: str) -> dict[str, object]:
    """What the numbers depend on: CPU, threads, library versions, accelerator, load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    return dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        cuda=torch.version.cuda if device == "cuda" else None,
        cudnn=torch.backends.cudnn.version() if device == "cuda" else None,
        load_average=load_average(),
        time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def _inference(call: Callable[[], object], device: str, amp: bool) -> Callable[[], object]:
    """``call`` without autograd, under autocast when ``amp`` (fp16 on CUDA, bf16 on CPU)."""
    dtype = torch.float16 if device == "cuda" else torch.bfloat16

    def run() -> object:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=amp):
            return call()

    return run


def _time_cell(models: Mapping[str, nn.Module], shape: tuple[int, int, int], settings: BenchSettings) -> list[dict]:
    """Latency of every (model, backend) at one (batch, height, width), interleaved; skipped ones with reasons."""
    batch, height, width = shape
    example = torch.randn(batch, 3, height, width, device=settings.device)
    records, calls = [], {}
    for model_name, model in models.items():
        for backend in settings.backends:
            record = dict(model=model_name, backend=backend, batch=batch, height=height, width=width)
            try:
                if isinstance(model, PackagedModel):
                    model.check_runnable(backend, example)
                calls[(model_name, backend)] = _inference(
                    BACKENDS[backend](model, example), settings.device, settings.amp
                )
                record["status"] = "ok"
            except BackendUnavailable as exc:
                record.update(status="skipped", reason=exc.reason)
            records.append(record)
    if calls:
        on_cuda = settings.device == "cuda"
        samples = time_interleaved(
            {f"{m}/{b}": call for (m, b), call in calls.items()},
            settings.warmup,
            settings.repeats,
            sync=torch.cuda.synchronize if on_cuda else None,
            clock=cuda_event_clock() if on_cuda else None,
        )
        for record in records:
            if record["status"] == "ok":
                record["samples_s"] = samples[f"{record['model']}/{record['backend']}"]
                record["summary"] = summarize(record["samples_s"])
    return records


def _model_info(model: nn.Module, settings: BenchSettings) -> dict[str, object]:
    """Implementation, parameters and MACs per image at each benchmarked size (counted on meta: free;
    a compiled package's were counted when it was exported, at its one size)."""
    if isinstance(model, PackagedModel):
        macs = {size_label(*model.image_shape[1:]): model.macs}
        return dict(implementation=f"AOTInductor package {model.source}", params=model.params, macs_per_image=macs)
    meta = copy.deepcopy(model).to("meta")
    return dict(
        implementation=f"{type(model).__module__}.{type(model).__qualname__}",
        params=count_params(model),
        macs_per_image={
            size_label(h, w): count_macs(meta, (1, 3, h, w))
            for h, w in dict.fromkeys((h, w) for _, h, w in settings.shapes)
        },
    )


def _memory(models: Mapping[str, nn.Module], settings: BenchSettings) -> dict[str, object]:
    """Saved activations (exact) at the memory shapes; CUDA training peak, or CPU inference RSS growth
    and live tensor peak at the inference memory shapes, and the whole-process memory of serving each
    model on ``process_memory_engines`` at the first. Not of compiled packages: they run at one size, and
    never train."""
    models = {name: model for name, model in models.items() if not isinstance(model, PackagedModel)}
    memory: dict[str, object] = {
        "saved_tensor_bytes": {
            name: {shape_key(b, h, w): saved_tensor_bytes(model, (b, 3, h, w)) for b, h, w in settings.memory_shapes}
            for name, model in models.items()
        }
    }
    try:
        if settings.device == "cuda":
            memory["cuda_training_peak_bytes"] = {
                name: {
                    shape_key(b, h, w): cuda_training_peak_bytes(model, (b, 3, h, w), settings.device, settings.amp)
                    for b, h, w in settings.memory_shapes
                }
                for name, model in models.items()
            }
        else:
            cells = settings.inference_memory_shapes
            measured = inference_memory_bytes(models, [(b, 3, h, w) for b, h, w in cells], settings.threads)
            for measure, per_model in measured.items():
                memory[measure] = {
                    name: {shape_key(*cell): value for cell, value in zip(cells, values)}
                    for name, values in per_model.items()
                }
            if settings.process_memory_engines:
                batch, height, width = cells[0]
                memory |= process_memory_bytes(
                    models, settings.process_memory_engines, (batch, 3, height, width), settings.threads
                )
    except MemoryUnavailable as exc:
        memory["skipped"] = str(exc)
    return memory


@contextlib.contextmanager
def _benchmark_mode(settings: BenchSettings) -> Iterator[None]:
    """Fixed torch thread count and (on CUDA) cudnn autotuning, restored afterwards."""
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    torch.set_num_threads(settings.threads or threads)
    torch.backends.cudnn.benchmark = settings.device == "cuda" or cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def is_model_file(entry: str) -> bool:
    """Whether a ``--models`` entry names a model file (a trained or pruned network, or an AOTInductor
    package) rather than a name."""
    return entry.endswith((*MODEL_FILE_SUFFIXES, PACKAGE_SUFFIX))


def _bench_model(entry: str) -> nn.Module:
    """A network by name, or the one a model file holds (which must take RGB images, as the bench feeds)."""
    if not is_model_file(entry):
        return create_model(entry)
    model = load_package(entry) if entry.endswith(PACKAGE_SUFFIX) else load(entry)
    if model.card.in_chans != 3:
        raise ValueError(f"{entry} takes {model.card.in_chans} input channel(s); the bench feeds RGB images")
    return model


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = lambda message: None) -> dict[str, object]:
    """Measure ``settings`` and return every raw sample, summary and the machine, JSON-ready."""
    with _benchmark_mode(settings):
        torch.manual_seed(0)
        models = {name: _bench_model(name).to(settings.device).eval() for name in settings.models}
        result: dict[str, object] = dict(
            machine=machine_description(settings.device),
            settings=asdict(settings),
            backends={name: BACKENDS[name].summary for name in settings.backends},
            reference=REFERENCE_MODEL,
        )
        log(f"counting parameters and MACs of {', '.join(models)}")
        result["models"] = {name: _model_info(model, settings) for name, model in models.items()}
        result["latency"] = []
        for batch, height, width in settings.shapes:
            log(
                f"timing batch {batch} at {width}x{height} (width x height): "
                f"{settings.warmup} warm-up + {settings.repeats} interleaved rounds"
            )
            cell, load = _time_cell(models, (batch, height, width), settings), load_average()
            result["latency"] += [{**record, "load_average": load} for record in cell]  # read by bench.reliability
        result["best_vs_best"] = best_vs_best(result)
        log("measuring memory")
        result["memory"] = _memory(models, settings)
        result["machine"]["load_average_end"] = load_average()
    return result


def best_vs_best(result: Mapping) -> list[dict]:
    """Each model's fastest backend at each shape against the reference's fastest, per precision.

    Only backends that keep the network (:func:`selecsls.deploy.backends.predict_backends`: not
    the pruned ones) compete, and only with backends of the same precision (fp32 with fp32, int8
    with int8). One row per precision, model and shape measured: the winning backend, its median
    latency, frames per second, speed-up over the reference's best and ``mac_bound``, the speed-up
    a model would have at the reference's efficiency per multiply-accumulate (its MAC ratio).
    """
    same_network = set(predict_backends())
    fastest: dict[tuple, dict] = {}
    for record in result["latency"]:
        if record["status"] != "ok" or record["backend"] not in same_network:
            continue
        key = (
            BACKENDS[record["backend"]].precision,
            record["model"],
            record["batch"],
            record["height"],
            record["width"],
        )
        if key not in fastest or record["summary"]["median"] < fastest[key]["summary"]["median"]:
            fastest[key] = record
    reference, macs = result["reference"], result["models"]
    rows = []
    for (precision, model, batch, height, width), record in fastest.items():
        median = record["summary"]["median"]
        reference_record = fastest.get((precision, reference, batch, height, width))
        label = size_label(height, width)
        rows.append(
            dict(
                precision=precision,
                model=model,
                batch=batch,
                height=height,
                width=width,
                backend=record["backend"],
                median_s=median,
                frames_per_s=batch / median,
                speedup=reference_record["summary"]["median"] / median if reference_record else None,
                mac_bound=macs[reference]["macs_per_image"][label] / macs[model]["macs_per_image"][label]
                if reference in macs
                else None,
            )
        )
    return rows
