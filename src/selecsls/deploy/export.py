"""Export a model to ONNX, an AOTInductor package or an OpenVINO IR, and prove the file computes what the model does.

Every export is checked before it lands on disk: the written file is loaded back (ONNX
Runtime for ONNX, AOTInductor's loader for a ``.pt2`` package, OpenVINO's CPU plugin for the
IR) and run on random inputs and on any real images given, and its outputs are compared with
the PyTorch model's. The file (the IR's .xml and .bin together) is only moved into place when
the largest difference is within the format's tolerance (:data:`TOLERANCES`) of the output's scale.

ONNX is produced by torch's ``torch.export``-based exporter (``dynamo=True``, with
``onnxscript``): the TorchScript-based one is deprecated, as TorchScript is (the ``aoti``
package replaces TorchScript's frozen file; :mod:`selecsls.deploy.aoti`). ONNX Runtime folds
the BatchNorms into the convs when it loads the graph. docs/deployment.md has the measured
speed of the exported graphs. The OpenVINO IR is converted from that ONNX graph
(:mod:`selecsls.deploy.openvino_ir` says why and how its precision is kept fp32).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, atomic_path, check_output, one_line, printable
from selecsls._optional import require
from selecsls.deploy import aoti, openvino_ir
from selecsls.deploy.backends import BackendUnavailable, Runner, first_line
from selecsls.models.compare import check_finite_outputs, relative_difference
from selecsls.models.files import CheckpointError

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "RELATIVE_TOLERANCE",
    "TOLERANCES",
    "ExportCheck",
    "ExportMismatchError",
    "aoti_backend",
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
]

EXPORT_FORMATS = ("onnx", "aoti", "openvino")
#: Formats whose graph can be exported with free batch and spatial size.
DYNAMIC_FORMATS = ("onnx", "openvino")
ONNX_OPSET = 18
#: An export fails when max |exported - pytorch| exceeds this fraction of max |pytorch output|.
RELATIVE_TOLERANCE = 1e-4
#: Per format, where it differs: an AOTInductor package is PyTorch's own kernels, held to 1e-5.
TOLERANCES = {"aoti": 1e-5}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: Key under which exported files carry the preprocessing and class names (``pretrained_cfg``): an ONNX
#: model property under the same key as an AOTInductor package's metadata.
METADATA_KEY = aoti.CARD_KEY


class ExportMismatchError(RuntimeError):
    """The exported file does not reproduce the PyTorch model's outputs."""


@dataclass(frozen=True)
class ExportCheck:
    """How far an exported model's outputs are from PyTorch's on one set of inputs."""

    inputs: str
    max_abs_diff: float
    relative_diff: float  # :func:`selecsls.models.compare.relative_difference`
    tolerance: float = RELATIVE_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else f"FAILED (tolerance {self.tolerance:g})"
        return f"{self.inputs}: max abs diff {self.max_abs_diff:.3g}, relative {self.relative_diff:.3g} {verdict}"


@contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """The ONNX exporter logs that torchvision's operators cannot be registered (torchvision is not
    installed, and this network needs none of them): noise to users."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with aoti.quiet_torch_internals():
            yield
    finally:
        registration.setLevel(level)


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
    require("onnxscript", "to export to ONNX")
    free = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with _quiet_onnx_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model.eval(),
            (example,),
            dynamo=True,
            verbose=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(free,) if dynamic else None,
        )
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's provenance (FX node text, module scopes): half the file
        del node.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: _metadata(model, example)})
    return proto.SerializeToString()


def to_openvino(model: nn.Module, example: Tensor, dynamic: bool = False):
    """The ``openvino.Model`` of :func:`to_onnx`'s graph, with ``pretrained_cfg`` as runtime info."""
    return openvino_ir.from_onnx(to_onnx(model, example, dynamic), _metadata(model, example))


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


def _require_match(
    model: nn.Module, run: Runner, example: Tensor, what: str, tolerance: float = RELATIVE_TOLERANCE
) -> None:
    """Raise :class:`ExportMismatchError` unless ``run`` reproduces ``model`` on ``example``."""
    check = compare_outputs(model, run, [("example", example)], tolerance)[0]
    if not check.passed:
        raise ExportMismatchError(f"the {what} export is not exact: {check}")


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


def aoti_backend(model: nn.Module, example: Tensor) -> Runner:
    """An AOTInductor package of the model compiled at the example's shape (batch 1), checked against PyTorch."""
    try:
        package = aoti.compile_package(model, example, _metadata(model, example))
    except ValueError as exc:
        raise BackendUnavailable(str(exc)) from exc
    except Exception as exc:  # inductor needs a working C++ toolchain; export rejects some Python
        raise BackendUnavailable(f"AOTInductor compilation failed: {first_line(exc)}") from exc
    with tempfile.TemporaryDirectory(prefix="selecsls-aoti-") as folder:
        path = os.path.join(folder, "model.pt2")
        with open(path, "wb") as file:
            file.write(package)
        run = aoti.load_package(path)  # the C++ loader keeps what it needs; the file can go
    try:
        _require_match(model, run, example, "AOTInductor", TOLERANCES["aoti"])
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


def compare_outputs(
    model: nn.Module, run: Runner, inputs: Sequence[tuple[str, Tensor]], tolerance: float = RELATIVE_TOLERANCE
) -> list[ExportCheck]:
    """Run ``model`` and the exported ``run`` on each labelled input batch and measure the gap."""
    checks = []
    with torch.no_grad():
        for label, batch in inputs:
            expected, exported = check_finite_outputs(model(batch), f"the check inputs ({label})"), run(batch)
            max_abs_diff = float((exported - expected).abs().max())
            checks.append(ExportCheck(label, max_abs_diff, relative_difference(expected, exported), tolerance))
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
    is a preprocessed batch of real images at that size. ``dynamic`` (ONNX and OpenVINO) frees batch
    and spatial size, and is then checked at a second shape. An OpenVINO IR is ``path`` (.xml) and
    the .bin beside it; an AOTInductor package (``.pt2``) runs one image at a time at the export size.
    Raises :class:`ExportMismatchError` (leaving ``path`` untouched) if any check fails.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    if dynamic and format not in DYNAMIC_FORMATS:
        raise ValueError("dynamic applies to ONNX and OpenVINO: an AOTInductor package is compiled for the export size")
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
            # Compiled in memory and written by Python: a full disk is an error that keeps the previous file.
            tmp.write_bytes(aoti.compile_package(model, example, _metadata(model, example)))
            run = aoti.load_package(tmp)
        tolerance = TOLERANCES.get(format, RELATIVE_TOLERANCE)
        checks = compare_outputs(
            model,
            run if dynamic else one_image_at_a_time(run),
            _check_inputs(model, example, dynamic, images),
            tolerance,
        )
        failed = [check for check in checks if not check.passed]
        if failed:
            raise ExportMismatchError(
                f"exported {format} model differs from PyTorch beyond {tolerance:g} relative "
                f"({'; '.join(map(str, failed))}); {os.fspath(path)!r} was not written"
            )
    return checks
