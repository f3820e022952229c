"""Memory a network needs: saved activations (exact), CUDA training peak, CPU inference RSS.

Four measures, from most to least portable:

- :func:`saved_tensor_bytes` counts the tensors autograd keeps for backward in one training
  forward pass. It runs on the ``meta`` device (no data, no compute), so it is exact, instant
  and identical on every machine: the architecture's activation memory, free of allocator noise.
- :func:`cuda_training_peak_bytes` is what a GPU really allocates for a training step.
- :func:`inference_memory_bytes` is what a CPU process really grows by for one inference, and the
  tensor memory live at once during it.
- :func:`process_memory_bytes` is the user's view: what a whole fresh process holds to serve a
  model on one engine (eager, frozen, ONNX Runtime, OpenVINO), weights and runtime included.
"""

from __future__ import annotations

import copy
import gc
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from selecsls.deploy.freeze import freeze

__all__ = [
    "PROCESS_ENGINES",
    "MemoryUnavailable",
    "cuda_training_peak_bytes",
    "inference_memory_bytes",
    "process_memory_bytes",
    "saved_tensor_bytes",
]


class MemoryUnavailable(RuntimeError):
    """A memory measure this machine cannot take (e.g. no CUDA, no Linux /proc)."""


def _storage_key(tensor: torch.Tensor) -> int:
    # The address of the storage object: unlike data_ptr (always 0 on meta) it tells storages
    # apart on every device, and views of one storage share it.
    return tensor.untyped_storage()._cdata


def saved_tensor_bytes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward pass.

    Counted with saved-tensor hooks on a ``meta`` copy of ``model`` in training mode. Each
    storage counts once however many ops save it (a ReLU output read by the next conv is
    stored once); parameters and buffers are excluded, they exist with or without training.
    The input batch counts: the first conv keeps it for its weight gradient.
    """
    meta_model = copy.deepcopy(model).to("meta").train()
    weights = {_storage_key(t) for t in itertools.chain(meta_model.parameters(), meta_model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        meta_model(torch.zeros(*input_shape, device="meta"))
    return sum(saved.values())


def cuda_training_peak_bytes(
    model: nn.Module, input_shape: Sequence[int], device: str = "cuda", amp: bool = False
) -> int:
    """Peak CUDA memory of one training step (forward, cross-entropy, backward, SGD step) above
    what was allocated before it (weights, momentum). A first, untimed step allocates the
    optimizer state and lets cudnn pick its algorithms, so their trial workspaces do not count."""
    if not torch.cuda.is_available():
        raise MemoryUnavailable("CUDA is not available")
    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(*input_shape, device=device)
    with torch.no_grad():
        num_classes = model(images[:1]).shape[1]
    targets = torch.randint(0, num_classes, (input_shape[0],), device=device)

    def step() -> None:
        with torch.autocast("cuda", enabled=amp):
            loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MemoryUnavailable(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS


#: Untimed calls before measuring: the first makes one-time workspaces (oneDNN primitives), which a
#: steady call does not.
STEADY_WARMUP_CALLS = 2


def _allocated_peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes held through torch's CPU allocator during ``call()`` above those held before it:
    activations, op workspaces and oneDNN's per-call weight copies (ideep allocates through torch),
    from the allocation events of ``torch.profiler``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        call()
    events = [event for event in profile.profiler.kineto_results.events() if event.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _inference_memory(
    models: Mapping[str, nn.Module], input_shapes: Sequence[Sequence[int]], threads: int
) -> dict[str, dict[str, list[int]]]:
    """Per measure, model and input shape: one steady inference call's peak RSS above the RSS just
    before it, and its live tensor peak (:func:`_allocated_peak_bytes`)."""
    torch.set_num_threads(threads)
    growth: dict[str, list[int]] = {}
    live: dict[str, list[int]] = {}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            growth[name], live[name] = [], []
            for shape in input_shapes:
                images = torch.randn(*shape)
                for _ in range(STEADY_WARMUP_CALLS):
                    model(images)
                before = _proc_status_kib("VmRSS")
                _reset_peak()
                model(images)
                growth[name].append((_proc_status_kib("VmHWM") - before) * 1024)
                live[name].append(_allocated_peak_bytes(partial(model, images)))
                del images
    return {"inference_rss_growth_bytes": growth, "inference_live_peak_bytes": live}


def _measure_in_child() -> None:
    """Entry point of the measuring process: job pickled on stdin, result as JSON on stdout."""
    job = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)
    print(json.dumps(_inference_memory(**job)))


def inference_memory_bytes(
    models: Mapping[str, nn.Module], input_shapes: Sequence[Sequence[int]], threads: int | None = None
) -> dict[str, dict[str, list[int]]]:
    """Memory of one steady-state CPU inference call, per model and input shape, under two measures:
    ``inference_rss_growth_bytes``, the peak resident-memory growth of the process, and
    ``inference_live_peak_bytes``, the peak of live tensor memory (activations, workspaces, weight copies).

    Measured in a fresh process (one for all models: starting Python with torch is the slow
    part) whose allocator returns every large block to the system on free (glibc's mmap
    threshold pinned at 128 KiB): otherwise memory freed by an earlier call or model is
    reused unseen and the growth reads near zero. Linux only (needs the /proc peak-RSS reset).
    """
    job = io.BytesIO()
    shapes = [tuple(shape) for shape in input_shapes]
    torch.save(dict(models=dict(models), input_shapes=shapes, threads=threads or torch.get_num_threads()), job)
    return _run_child("_measure_in_child", job.getvalue(), {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})


def _run_child(entry: str, job: bytes, env: Mapping[str, str]) -> dict:
    """Run ``entry`` of this module in a fresh Python process on ``job`` (stdin); its JSON result (last line)."""
    if not sys.platform.startswith("linux"):
        raise MemoryUnavailable(f"RSS peak reset needs Linux /proc, this is {sys.platform}")
    child = subprocess.run(
        [sys.executable, "-c", f"from selecsls.bench.memory import {entry}; {entry}()"],
        input=job,
        capture_output=True,
        check=False,
        env=os.environ | dict(env),
    )
    if child.returncode != 0:
        last_line = (child.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise MemoryUnavailable(f"RSS measuring process failed: {last_line}")
    return json.loads(child.stdout.decode().splitlines()[-1])


#: The engines :func:`process_memory_bytes` serves a model on, as a user runs each: the model called
#: eagerly, :func:`selecsls.freeze`'s snapshot (the original dropped), and the files ``selecsls export``
#: writes (ONNX, OpenVINO IR) loaded by their runtimes.
PROCESS_ENGINES = ("eager", "frozen", "onnxruntime", "openvino")
#: Inference calls before the steady memory is read.
PROCESS_CALLS = 3
_EXPORT_FORMATS = {"onnxruntime": ("onnx", "model.onnx"), "openvino": ("openvino", "model.xml")}


def _serve(engine: str, source: str, threads: int) -> Callable[[torch.Tensor], object]:
    """In the measuring process: the model file ``source`` loaded and made ready to serve on ``engine``."""
    if engine == "onnxruntime":
        from selecsls.deploy.export import onnx_session, session_runner

        return session_runner(onnx_session(source, threads))
    if engine == "openvino":
        from selecsls.deploy import openvino_ir

        return openvino_ir.compiled_runner(openvino_ir.read_ir(source), threads)
    model = torch.load(source, weights_only=False).eval()
    if engine == "frozen":
        return freeze(model, consume=True)  # as selecsls eval serves a file: the original's tensors released as folded
    return model


def _process_memory_in_child() -> None:
    """Entry point of one whole-process measurement: job as JSON on stdin, bytes as JSON on stdout.

    The baseline is the RSS once torch and this package are imported (what ``import selecsls``
    and any use of torch cost every engine alike); each figure is above it.
    """
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    _reset_peak()
    run = _serve(job["engine"], job["source"], job["threads"])
    gc.collect()
    load_peak = _proc_status_kib("VmHWM")
    _reset_peak()
    images = torch.randn(*job["input_shape"])
    with torch.inference_mode():
        for _ in range(job["calls"]):
            run(images)
    result = dict(
        load_peak=load_peak - baseline,
        run_peak=_proc_status_kib("VmHWM") - baseline,
        steady=_proc_status_kib("VmRSS") - baseline,
    )
    print(json.dumps({key: kib * 1024 for key, kib in result.items()}))


def _model_file(model: nn.Module, engine: str, folder: str, input_shape: Sequence[int]) -> str:
    """The file a user would serve ``model`` from on ``engine``: the pickled module, or its export."""
    if engine not in _EXPORT_FORMATS:
        path = os.path.join(folder, "model.pt")
        if not os.path.exists(path):
            torch.save(model, path)
        return path
    from selecsls.deploy.export import export_model

    export_format, name = _EXPORT_FORMATS[engine]
    path = os.path.join(folder, name)
    export_model(model, path, export_format, input_size=tuple(input_shape[1:]))
    return path


def process_memory_bytes(
    models: Mapping[str, nn.Module],
    engines: Sequence[str] = PROCESS_ENGINES,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    threads: int | None = None,
    calls: int = PROCESS_CALLS,
) -> dict[str, dict[str, dict[str, int]]]:
    """Whole-process memory of serving each model on each engine, as a user sees it: per measure,
    model and engine, bytes above a fresh process's RSS with torch and selecsls imported:

    - ``process_load_peak_bytes``: the peak while loading the model file and readying the engine
      (for ``frozen``: loading, then ``freeze(model, consume=True)``, as ``selecsls eval`` does);
    - ``process_run_peak_bytes``: the peak during ``calls`` inference calls on ``input_shape``, the
      model ready (the load peak forgotten);
    - ``process_steady_bytes``: the resident memory after those calls;
    - ``weight_bytes`` (engine ``weights``): the model's parameters and buffers, for scale.

    One fresh process per model and engine, the default allocator (as a user runs it); an engine
    whose package is missing is left out and named in ``process_memory_skipped``. Linux only.
    """
    unknown = [engine for engine in engines if engine not in PROCESS_ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {', '.join(PROCESS_ENGINES)}")
    threads = threads or torch.get_num_threads()
    measures = ("process_load_peak_bytes", "process_run_peak_bytes", "process_steady_bytes")
    result: dict[str, dict] = {measure: {} for measure in (*measures, "weight_bytes")}
    skipped: dict[str, str] = {}
    for name, model in models.items():
        tensors = itertools.chain(model.parameters(), model.buffers())
        result["weight_bytes"][name] = {"weights": sum(t.numel() * t.element_size() for t in tensors)}
        with tempfile.TemporaryDirectory(prefix="selecsls-memory-") as folder:
            for engine in engines:
                try:
                    source = _model_file(model, engine, folder, input_shape)
                except ImportError as exc:  # the engine's optional package (its extra is named)
                    skipped[engine] = str(exc).strip().splitlines()[0]
                    continue
                job = dict(engine=engine, source=source, input_shape=list(input_shape), threads=threads, calls=calls)
                measured = _run_child("_process_memory_in_child", json.dumps(job).encode(), {})
                for key, measure in zip(("load_peak", "run_peak", "steady"), measures):
                    result[measure].setdefault(name, {})[engine] = measured[key]
    if skipped:
        result["process_memory_skipped"] = skipped
    return result
