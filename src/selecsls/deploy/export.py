"""Export a model to ONNX, frozen TorchScript or an OpenVINO IR, and prove the file computes what the model does.

Every export is checked before it lands on disk: the written file is loaded back (ONNX
Runtime for ONNX, ``torch.jit.load`` for TorchScript, OpenVINO's CPU plugin for the IR) and
run on random inputs and on any real images given, and its outputs are compared with the
PyTorch model's. The file (the IR's .xml and .bin together) is only moved into place when the
largest difference is within :data:`RELATIVE_TOLERANCE` of the output's scale.

ONNX is produced by torch's TorchScript-based exporter (``dynamo=False``): this network is
only convs, ReLUs, additions and pooling, which that exporter handles completely, and it
needs no extra package (the torch.export-based exporter needs ``onnxscript``). ONNX
Runtime folds the BatchNorms into the convs when it loads the graph. docs/deployment.md has
the measured speed of the exported graphs. The OpenVINO IR is converted from that ONNX graph
(:mod:`selecsls.deploy.openvino_ir` says why and how its precision is kept fp32).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, atomic_path, check_output, one_line, printable
from selecsls._optional import require
from selecsls.deploy import openvino_ir
from selecsls.deploy.backends import BackendUnavailable, Runner
from selecsls.models.compare import check_finite_outputs, relative_difference
from selecsls.models.files import CheckpointError

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "RELATIVE_TOLERANCE",
    "ExportCheck",
    "ExportMismatchError",
    "checked_session",
    "compare_outputs",
    "export_model",
    "one_image_at_a_time",
    "onnxruntime_backend",
    "onnx_session",
    "openvino_backend",
    "read_metadata",
    "session_runner",
    "to_onnx",
    "to_openvino",
    "to_torchscript",
]

EXPORT_FORMATS = ("onnx", "torchscript", "openvino")
#: Formats whose graph can be exported with free batch and spatial size.
DYNAMIC_FORMATS = ("onnx", "openvino")
ONNX_OPSET = 18
#: An export fails when max |exported - pytorch| exceeds this fraction of max |pytorch output|.
RELATIVE_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: Key under which exported files carry the preprocessing and class names (``pretrained_cfg``).
METADATA_KEY = "selecsls.pretrained_cfg"


class ExportMismatchError(RuntimeError):
    """The exported file does not reproduce the PyTorch model's outputs."""


@dataclass(frozen=True)
class ExportCheck:
    """How far an exported model's outputs are from PyTorch's on one set of inputs."""

    inputs: str
    max_abs_diff: float
    relative_diff: float  # :func:`selecsls.models.compare.relative_difference`

    @property
    def passed(self) -> bool:
        return self.relative_diff <= RELATIVE_TOLERANCE

    def __str__(self) -> str:
        verdict = "ok" if self.passed else f"FAILED (tolerance {RELATIVE_TOLERANCE:g})"
        return f"{self.inputs}: max abs diff {self.max_abs_diff:.3g}, relative {self.relative_diff:.3g} {verdict}"


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """TorchScript and the TorchScript-based ONNX exporter warn that they are deprecated on every
    call; the choice is deliberate (module docstring), so the warning is noise to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.(jit|onnx)")
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        yield


def _example_input(model: nn.Module, input_size: Sequence[int] | None, batch: int = 1) -> Tensor:
    size = tuple(input_size or model.card.preprocessing.input_size)
    if len(size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {size}")
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def _metadata(model: nn.Module, example: Tensor) -> str:
    """The model's ``pretrained_cfg`` at the size it is exported at (the size predict then preprocesses to)."""
    return json.dumps(model.card.with_image_size(*example.shape[2:]).pretrained_cfg(), sort_keys=True)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The ``pretrained_cfg`` (preprocessing, class names) stored in an exported ONNX file or OpenVINO IR
    (.xml), unchecked.

    A file that is not ONNX, or damaged, is one :class:`CheckpointError` naming it.
    """
    if os.fspath(path).endswith(".xml"):
        return openvino_ir.ir_metadata(openvino_ir.read_ir(path), os.fspath(path))
    onnx = require("onnx", "to read an ONNX file")
    shown = printable(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {shown} does not exist or is not a regular file")
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: protobuf's errors share no base class
        raise CheckpointError(f"{shown} is not a readable ONNX file ({one_line(exc)})") from None
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{shown}: its {METADATA_KEY} metadata is not valid JSON ({exc})") from None
    raise CheckpointError(
        f"{shown} was not exported by selecsls (no {METADATA_KEY} metadata); "
        "export it with `selecsls export` or pass the PyTorch checkpoint"
    )


# --------------------------------------------------------------------------------- writers
def to_onnx(model: nn.Module, example: Tensor, dynamic: bool = False) -> bytes:
    """The serialised ONNX model (opset :data:`ONNX_OPSET`) with ``pretrained_cfg`` as metadata.

    ``dynamic`` makes batch, height and width free dimensions; otherwise the graph is fixed to
    ``example``'s shape (which lets ONNX Runtime plan memory once).
    """
    onnx = require("onnx", "to export to ONNX")
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet_deprecations(), torch.no_grad():
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {METADATA_KEY: _metadata(model, example)})
    return proto.SerializeToString()


def to_openvino(model: nn.Module, example: Tensor, dynamic: bool = False):
    """The ``openvino.Model`` of :func:`to_onnx`'s graph, with ``pretrained_cfg`` as runtime info."""
    return openvino_ir.from_onnx(to_onnx(model, example, dynamic), _metadata(model, example))


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    """The model scripted and frozen: weights become constants, BatchNorm is folded into convs."""
    with _quiet_deprecations():
        return torch.jit.freeze(torch.jit.script(model.eval()))


def onnx_session(model: PathLike | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for an ONNX file or serialised model.

    Worker threads sleep between runs instead of spinning: on a shared CPU (and when ONNX
    Runtime alternates with PyTorch, as in the interleaved benchmark) spinning threads steal
    cores from everything else.
    """
    ort = require("onnxruntime", "to run ONNX models")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _require_match(model: nn.Module, run: Runner, example: Tensor, what: str) -> None:
    """Raise :class:`ExportMismatchError` unless ``run`` reproduces ``model`` on ``example``."""
    check = compare_outputs(model, run, [("example", example)])[0]
    if not check.passed:
        raise ExportMismatchError(f"the {what} export is not exact: {check} (tolerance {RELATIVE_TOLERANCE:g})")


def checked_session(model: nn.Module, example: Tensor, dynamic: bool = False):
    """An ONNX Runtime session of ``model`` exported in memory, trusted only after it matched
    PyTorch on ``example``; raises :class:`ExportMismatchError` otherwise."""
    session = onnx_session(to_onnx(model, example, dynamic))
    _require_match(model, session_runner(session), example, "ONNX")
    return session


def onnxruntime_backend(model: nn.Module, example: Tensor) -> Runner:
    """ONNX Runtime (CPU, fp32) on the model exported at the example's shape, checked against PyTorch."""
    try:
        return session_runner(checked_session(model, example))
    except ExportMismatchError as exc:
        raise BackendUnavailable(str(exc)) from exc


def openvino_backend(model: nn.Module, example: Tensor) -> Runner:
    """OpenVINO (CPU plugin, fp32 pinned) on the model converted at the example's shape, checked against PyTorch."""
    run = openvino_ir.compiled_runner(to_openvino(model, example))
    try:
        _require_match(model, run, example, "OpenVINO")
    except ExportMismatchError as exc:
        raise BackendUnavailable(str(exc)) from exc
    return run


def session_runner(session) -> Runner:
    """``session`` as a function Tensor -> Tensor."""
    input_name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


# ------------------------------------------------------------------------------- checking
def one_image_at_a_time(run: Runner) -> Runner:
    """``run`` of a graph exported with a fixed batch of 1, made to accept any batch."""
    return lambda batch: torch.cat([run(image[None]) for image in batch])


def compare_outputs(model: nn.Module, run: Runner, inputs: Sequence[tuple[str, Tensor]]) -> list[ExportCheck]:
    """Run ``model`` and the exported ``run`` on each labelled input batch and measure the gap."""
    checks = []
    with torch.no_grad():
        for label, batch in inputs:
            expected, exported = check_finite_outputs(model(batch), f"the check inputs ({label})"), run(batch)
            max_abs_diff = float((exported - expected).abs().max())
            checks.append(ExportCheck(label, max_abs_diff, relative_difference(expected, exported)))
    return checks


def _check_inputs(model: nn.Module, example: Tensor, varied_shape: bool, images: Tensor | None):
    """Random inputs at the export size (and at another batch and size), plus the real images."""
    inputs = [(f"random {tuple(example.shape)}", example)]
    if varied_shape:
        _, channels, height, width = example.shape
        other = _example_input(model, (channels, height + 32, width + 64), batch=2)
        inputs.append((f"random {tuple(other.shape)}", other))
    if images is not None and len(images):
        inputs.append((f"{len(images)} real image(s)", images))
    return inputs


def export_model(
    model: nn.Module,
    path: PathLike,
    format: str,
    *,
    input_size: Sequence[int] | None = None,
    dynamic: bool = False,
    images: Tensor | None = None,
) -> list[ExportCheck]:
    """Write ``model`` to ``path`` as ``format`` (one of :data:`EXPORT_FORMATS`) and return the checks.

    ``input_size`` (C, H, W) defaults to the model card's; the file's metadata records it; ``images``
    is a preprocessed batch of real images at that size. ``dynamic`` (ONNX and OpenVINO;
    TorchScript always accepts any shape) frees batch and spatial size, and is then checked at a
    second shape. An OpenVINO IR is ``path`` (.xml) and the .bin beside it. Raises
    :class:`ExportMismatchError` (leaving ``path`` untouched) if any check fails.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if dynamic and format not in DYNAMIC_FORMATS:
        raise ValueError("dynamic applies to ONNX and OpenVINO: TorchScript already accepts any batch and image size")
    model.card.require_outputs("export", class_scores=False)
    for output in openvino_ir.ir_files(path) if format == "openvino" else (path,):
        check_output(output)
    model = model.eval()
    example = _example_input(model, input_size)
    if images is not None and tuple(images.shape[1:]) != tuple(example.shape[1:]):
        raise ValueError(f"real images are {tuple(images.shape[1:])} but the export size is {tuple(example.shape[1:])}")
    writer = openvino_ir.staged_ir(path) if format == "openvino" else atomic_path(path)
    with writer as tmp:
        if format == "onnx":
            tmp.write_bytes(to_onnx(model, example, dynamic))
            run = session_runner(onnx_session(tmp))
        elif format == "openvino":
            openvino_ir.save_ir(to_openvino(model, example, dynamic), tmp)
            run = openvino_ir.compiled_runner(openvino_ir.read_ir(tmp))
        else:
            # Serialised in memory and written by Python: torch.jit.save's own file writer aborts the
            # process on a full disk, Python's raises an error that leaves the previous file in place.
            buffer = io.BytesIO()
            with _quiet_deprecations():
                torch.jit.save(to_torchscript(model), buffer, _extra_files={METADATA_KEY: _metadata(model, example)})
            tmp.write_bytes(buffer.getvalue())
            with _quiet_deprecations():
                run = torch.jit.load(tmp)
        any_shape = format == "torchscript" or dynamic
        checks = compare_outputs(
            model, run if any_shape else one_image_at_a_time(run), _check_inputs(model, example, any_shape, images)
        )
        failed = [check for check in checks if not check.passed]
        if failed:
            raise ExportMismatchError(
                f"exported {format} model differs from PyTorch beyond {RELATIVE_TOLERANCE:g} relative "
                f"({'; '.join(map(str, failed))}); {os.fspath(path)!r} was not written"
            )
    return checks
