"""The one table of inference backends, used by ``selecsls bench``, ``selecsls predict`` and export checks.

A backend turns an fp32 model in eval mode and an example input (both on the target
device) into a :data:`Runner`: a function running one inference on inputs shaped like the
example (compiled, converted and warmed as needed), returning logits as a tensor. A backend
that cannot run here raises :class:`BackendUnavailable` with the reason, and callers report
it as skipped; so does one whose optional package is missing (an ImportError while building).
Adding a backend is one :class:`Backend` entry in :data:`BACKENDS`; its code (and optional
dependencies) are imported only when it is built, so this module, and the CLI help that lists
the table, import neither torch nor any runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "Runner",
    "device_backends",
    "first_line",
    "predict_backends",
]

#: One inference on an input shaped like the example the runner was built for.
Runner = Callable[["Tensor"], "Tensor"]


class BackendUnavailable(RuntimeError):
    """This backend cannot run this model here; ``reason`` says why (shown as 'skipped: reason')."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line skip reasons."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


@dataclass(frozen=True)
class Backend:
    """One way to run a model. ``builder`` is ``"module:function"``, imported on first use.

    ``exact``: outputs equal the model's (fp32, same weights); int8, fp16 and pruning are not.
    ``precision``: the arithmetic, for comparing like with like (fp32, fp16, int8).
    ``device``: the one device type it runs on ("cpu": ONNX Runtime's CPU provider; "cuda":
    CUDA graphs), None for any.
    ``fixed_shape``: the runner accepts only the example's shape (a graph exported at it).
    """

    name: str
    summary: str
    builder: str
    exact: bool = True
    precision: str = "fp32"
    device: str | None = None
    fixed_shape: bool = False

    def build(self, model: nn.Module, example: Tensor) -> Runner:
        if self.device is not None and example.device.type != self.device:
            raise BackendUnavailable(
                f"backend {self.name} runs on {self.device} only; the example is on {example.device.type}"
            )
        module, function = self.builder.split(":")
        try:
            build = getattr(importlib.import_module(module), function)
        except ImportError as exc:
            raise BackendUnavailable(f"{module} is not importable: {first_line(exc)}") from exc
        try:
            return build(model, example)
        except ImportError as exc:  # an optional runtime (selecsls._optional.require names its extra)
            raise BackendUnavailable(first_line(exc)) from exc

    def __call__(self, model: nn.Module, example: Tensor) -> Callable[[], Any]:
        """A zero-argument call running the built backend on ``example`` (what the benchmark times)."""
        run = self.build(model, example)
        return lambda: run(example)


_TORCH = "selecsls.deploy.runtimes"
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("eager", "plain PyTorch, NCHW memory layout", f"{_TORCH}:eager"),
        Backend(
            "frozen",
            "selecsls.freeze: BatchNorm folded, each conv's weight packed once in oneDNN's layout, ReLU fused "
            "(an inference-only snapshot, one copy of the weights)",
            f"{_TORCH}:frozen",
            device="cpu",
        ),
        Backend("channels_last", "eager, weights and input in NHWC (channels-last) layout", f"{_TORCH}:channels_last"),
        Backend(
            "compile",
            "torch.compile (inductor), weights frozen, compiled at the example's shape before timing",
            f"{_TORCH}:compile_inductor",
            fixed_shape=True,
        ),
        Backend("fused", "BatchNorm folded into the convs (selecsls.fuse; torch.fx for baselines)", f"{_TORCH}:fused"),
        Backend(
            "fused_channels_last", "BatchNorm folded, weights and input channels-last", f"{_TORCH}:fused_channels_last"
        ),
        Backend(
            "tuned",
            "BatchNorm folded; each spatial conv runs as oneDNN's conv or as an exact im2col matrix product, "
            "whichever was faster at the example's shape",
            f"{_TORCH}:tuned",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "onnxruntime",
            "ONNX Runtime (CPU, fp32) on the model exported at the example's shape, checked against PyTorch",
            "selecsls.deploy.export:onnxruntime_backend",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "aoti",
            "AOTInductor package (torch.export, frozen), compiled at the example's shape (batch 1; tens of "
            "seconds per model and shape), checked against PyTorch",
            "selecsls.deploy.export:aoti_backend",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "int8",
            "ONNX Runtime int8 (static QDQ) on the model exported at the example's shape",
            "selecsls.deploy.quantization:int8_backend",
            exact=False,
            precision="int8",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "openvino",
            "OpenVINO (CPU plugin, fp32 pinned) on the model converted at the example's shape, checked against PyTorch",
            "selecsls.deploy.export:openvino_backend",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "openvino_int8",
            "OpenVINO int8 (NNCF post-training quantization) on the model converted at the example's shape",
            "selecsls.deploy.quantization:openvino_int8_backend",
            exact=False,
            precision="int8",
            device="cpu",
            fixed_shape=True,
        ),
        Backend(
            "cuda_graphs",
            "BatchNorm folded, the forward pass captured once as a CUDA graph and replayed (no launch overhead)",
            f"{_TORCH}:cuda_graphs",
            device="cuda",
            fixed_shape=True,
        ),
        Backend(
            "cuda_graphs_fp16",
            "cuda_graphs with fp16 weights and activations in channels-last layout (tensor cores)",
            f"{_TORCH}:cuda_graphs_fp16",
            exact=False,
            precision="fp16",
            device="cuda",
            fixed_shape=True,
        ),
        Backend(
            "pruned",
            "selecsls.prune_to_budget to half the MACs (SelecSLS only): fused and narrower",
            f"{_TORCH}:pruned",
            exact=False,
        ),
        Backend(
            "pruned_int8",
            "the pruned model run by the int8 backend: the two speed-ups compound",
            f"{_TORCH}:pruned_int8",
            exact=False,
            precision="int8",
            device="cpu",
            fixed_shape=True,
        ),
    )
}


def predict_backends() -> list[str]:
    """Backends that keep the model's function (exact, or at lower precision): pruning changes the model."""
    return [name for name, backend in BACKENDS.items() if not name.startswith("pruned")]


def device_backends(device: str) -> list[str]:
    """:func:`predict_backends` that can run on ``device`` ("cpu" or "cuda"): the same network on every
    engine that may be available there (the real-time benchmark's default)."""
    return [name for name in predict_backends() if BACKENDS[name].device in (None, device)]
