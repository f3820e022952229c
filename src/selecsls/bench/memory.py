"""Memory a network needs: saved activations (exact), CUDA training peak, CPU inference RSS.

Three measures, from most to least portable:

- :func:`saved_tensor_bytes` counts the tensors autograd keeps for backward in one training
  forward pass. It runs on the ``meta`` device (no data, no compute), so it is exact, instant
  and identical on every machine: the architecture's activation memory, free of allocator noise.
- :func:`cuda_training_peak_bytes` is what a GPU really allocates for a training step.
- :func:`inference_memory_bytes` is what a CPU process really grows by for one inference, and the
  tensor memory live at once during it.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from selecsls.models.conv import packed_weight_bytes

__all__ = ["MemoryUnavailable", "cuda_training_peak_bytes", "inference_memory_bytes", "saved_tensor_bytes"]


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


#: Untimed calls before measuring: the first makes one-time workspaces and the model's eval-mode
#: conv choices (:class:`selecsls.models.conv.SmallMapConv2d`), which a steady call does not.
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
    before it, its live tensor peak (:func:`_allocated_peak_bytes`), and the reordered weights the
    model keeps between calls (:func:`selecsls.models.conv.packed_weight_bytes`)."""
    torch.set_num_threads(threads)
    growth: dict[str, list[int]] = {}
    live: dict[str, list[int]] = {}
    kept: dict[str, list[int]] = {}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            growth[name], live[name], kept[name] = [], [], []
            for shape in input_shapes:
                images = torch.randn(*shape)
                for _ in range(STEADY_WARMUP_CALLS):
                    model(images)
                before = _proc_status_kib("VmRSS")
                with open("/proc/self/clear_refs", "w") as clear_refs:
                    clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
                model(images)
                growth[name].append((_proc_status_kib("VmHWM") - before) * 1024)
                live[name].append(_allocated_peak_bytes(partial(model, images)))
                kept[name].append(packed_weight_bytes(model))
                del images
    return {
        "inference_rss_growth_bytes": growth,
        "inference_live_peak_bytes": live,
        "inference_kept_weight_bytes": kept,
    }


def _measure_in_child() -> None:
    """Entry point of the measuring process: job pickled on stdin, result as JSON on stdout."""
    job = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)
    print(json.dumps(_inference_memory(**job)))


def inference_memory_bytes(
    models: Mapping[str, nn.Module], input_shapes: Sequence[Sequence[int]], threads: int | None = None
) -> dict[str, dict[str, list[int]]]:
    """Memory of one steady-state CPU inference call, per model and input shape, under two measures:
    ``inference_rss_growth_bytes``, the peak resident-memory growth of the process, and
    ``inference_live_peak_bytes``, the peak of live tensor memory (activations, workspaces, weight copies),
    and ``inference_kept_weight_bytes``, the weight copies in oneDNN's layout kept between calls.

    Measured in a fresh process (one for all models: starting Python with torch is the slow
    part) whose allocator returns every large block to the system on free (glibc's mmap
    threshold pinned at 128 KiB): otherwise memory freed by an earlier call or model is
    reused unseen and the growth reads near zero. Linux only (needs the /proc peak-RSS reset).
    """
    if not sys.platform.startswith("linux"):
        raise MemoryUnavailable(f"RSS peak reset needs Linux /proc, this is {sys.platform}")
    job = io.BytesIO()
    shapes = [tuple(shape) for shape in input_shapes]
    torch.save(dict(models=dict(models), input_shapes=shapes, threads=threads or torch.get_num_threads()), job)
    child = subprocess.run(
        [sys.executable, "-c", "from selecsls.bench.memory import _measure_in_child; _measure_in_child()"],
        input=job.getvalue(),
        capture_output=True,
        check=False,
        env=os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
    )
    if child.returncode != 0:
        last_line = (child.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise MemoryUnavailable(f"RSS measuring process failed: {last_line}")
    return json.loads(child.stdout.decode().splitlines()[-1])
