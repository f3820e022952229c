"""Ways to run a model for inference, as data: ``BACKENDS[name](model, example) -> call``.

A backend takes an fp32 model in eval mode and an example input (both on the benchmark
device) and returns a zero-argument callable running one inference on that input, ready to
time (compiled, converted, warmed as needed). A backend that cannot run here raises
:class:`BackendUnavailable` with the reason, and the benchmark reports it as skipped. Adding
a backend is one entry in :data:`BACKENDS`; use :func:`lazy_backend` for one whose code (and
optional dependencies) live in another module.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "PRUNED_MACS_FRACTION", "describe_backend", "fused_model",
    "lazy_backend", "list_backends",
]

Backend = Callable[[nn.Module, Tensor], Callable[[], object]]

# Budget of the ``pruned`` backend, as a fraction of the fused model's MACs. With random
# weights no channel is free to remove, so this budget alone decides the pruned width.
PRUNED_MACS_FRACTION = 0.5


class BackendUnavailable(RuntimeError):
    """This backend cannot run this model here; ``reason`` says why (shown as 'skipped: reason')."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _call(model: Callable[[Tensor], object], example: Tensor) -> Callable[[], object]:
    return lambda: model(example)


def eager(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """Plain PyTorch, NCHW memory layout."""
    return _call(model, example)


def channels_last(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """Eager with weights and input in NHWC (channels-last) memory layout."""
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return _call(converted, example.contiguous(memory_format=torch.channels_last))


def script(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """TorchScript (``torch.jit.script``)."""
    try:
        scripted = torch.jit.script(model)
    except Exception as exc:  # scripting rejects unsupported Python in many distinct ways
        raise BackendUnavailable(f"torch.jit.script failed: {_first_line(exc)}") from exc
    return _call(scripted, example)


def compile_inductor(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """``torch.compile`` (inductor); compiled here, on the example, so timing excludes compilation."""
    compiled = torch.compile(model)
    try:
        with torch.no_grad():
            compiled(example)
    except Exception as exc:  # inductor needs a working C++ (CPU) or Triton (GPU) toolchain at run time
        raise BackendUnavailable(f"torch.compile failed: {_first_line(exc)}") from exc
    return _call(compiled, example)


def fused_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with BatchNorm folded into the convs, on ``device``: ``selecsls.fuse`` for
    SelecSLS, torch.fx conv-BN fusion otherwise."""
    from .model import SelecSLS

    if isinstance(model, SelecSLS):
        from .fusion import fuse

        return fuse(model).to(device)  # fuse builds the new model on the CPU
    from torch.fx.experimental.optimization import fuse as fx_fuse

    try:
        return fx_fuse(model)
    except Exception as exc:  # models that torch.fx cannot trace
        raise BackendUnavailable(f"torch.fx conv-BN fusion failed: {_first_line(exc)}") from exc


def fused(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """BatchNorm folded into the convs: ``selecsls.fuse`` for SelecSLS, torch.fx conv-BN fusion otherwise."""
    return _call(fused_model(model, example.device), example)


def _pruned_model(model: nn.Module, example: Tensor) -> nn.Module:
    """``selecsls.prune_to_budget(model, macs=PRUNED_MACS_FRACTION)`` on the example's device."""
    from .model import SelecSLS

    if not isinstance(model, SelecSLS):
        raise BackendUnavailable("pruning applies to SelecSLS models only")
    try:
        from .pruning import prune_to_budget
    except ImportError as exc:
        raise BackendUnavailable(f"selecsls.pruning is not importable: {_first_line(exc)}") from exc
    cpu_copy = copy.deepcopy(model).cpu()  # pruning is planned on the CPU, whatever the benchmark device
    smaller = prune_to_budget(cpu_copy, macs=PRUNED_MACS_FRACTION, input_size=(1, *example.shape[1:]))
    return smaller.to(example.device).eval()


def pruned(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """``selecsls.prune_to_budget(model, macs=PRUNED_MACS_FRACTION)`` (SelecSLS only): fused and narrower."""
    return _call(_pruned_model(model, example), example)


def pruned_int8(model: nn.Module, example: Tensor) -> Callable[[], object]:
    """The ``pruned`` model run by the ``int8`` backend: the two speed-ups compound."""
    return BACKENDS["int8"](_pruned_model(model, example), example)


def lazy_backend(module: str, function: str) -> Backend:
    """A backend implemented as ``function`` in ``module``, imported only when first used, so an
    optional dependency that is missing makes the backend skipped instead of breaking imports."""

    def build(model: nn.Module, example: Tensor) -> Callable[[], object]:
        try:
            backend = getattr(importlib.import_module(module), function)
        except ImportError as exc:
            raise BackendUnavailable(f"{module} is not importable: {_first_line(exc)}") from exc
        return backend(model, example)

    build.__doc__ = f"{module}.{function}"
    return build


BACKENDS: dict[str, Backend] = {
    "eager": eager,
    "channels_last": channels_last,
    "script": script,
    "compile": compile_inductor,
    "fused": fused,
    "pruned": pruned,
    "onnxruntime": lazy_backend("selecsls.export", "onnxruntime_backend"),
    "int8": lazy_backend("selecsls.quantization", "int8_backend"),
    "pruned_int8": pruned_int8,
}


def list_backends() -> list[str]:
    return list(BACKENDS)


def describe_backend(name: str) -> str:
    """First line of the backend's docstring (recorded in benchmark results)."""
    return (BACKENDS[name].__doc__ or name).strip().splitlines()[0]
