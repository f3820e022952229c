"""int8 post-training static quantization (ONNX Runtime; OpenVINO with NNCF), and its accuracy cost on real data.

Why ONNX Runtime's quantizer and not torch's PT2E flow: in torch 2.13 PT2E lives in the
separate ``torchao`` package, and its int8 model is only fast after ``torch.compile`` with
the inductor backend (a C++ toolchain and minutes of compilation for every new shape);
eager PT2E runs simulated (fake-quantized) fp32 and is slower than the float model. ONNX
Runtime quantizes in seconds with the package already used for export, and its MLAS int8
convolutions use AVX-512 VNNI on this CPU. docs/deployment.md has the measurements.

Format: QDQ (QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer
kernels), uint8 activations (post-ReLU activations are non-negative, so the full range is
used) and per-channel int8 weights; MinMax calibration on real images.

For OpenVINO, NNCF quantizes the IR with its CPU defaults
(:func:`selecsls.deploy.openvino_ir.quantize_ir`); the accuracy check is the same.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, atomic_path
from selecsls._optional import require
from selecsls.deploy import openvino_ir
from selecsls.deploy.backends import Runner
from selecsls.deploy.export import (
    ExportCheck,
    export_model,
    one_image_at_a_time,
    onnx_session,
    session_runner,
    to_onnx,
    to_openvino,
)

__all__ = [
    "INT8_FORMATS",
    "AccuracyComparison",
    "compare_accuracy",
    "export_int8",
    "int8_backend",
    "openvino_int8_backend",
    "quantize_onnx",
]

#: Export formats with an int8 version.
INT8_FORMATS = ("onnx", "openvino")


def quantize_onnx(fp32_model: bytes, calibration_images: Tensor) -> bytes:
    """The int8 version of a serialised fp32 ONNX model, calibrated on ``calibration_images``.

    ``calibration_images`` (N, C, H, W) are preprocessed exactly as at inference. They are
    fed in batches of the graph's fixed batch size (one at a time for a dynamic batch); a
    few dozen to a few hundred images from the training distribution are enough.
    """
    onnx = require("onnx", "for int8 quantization")
    require("onnxruntime", "for int8 quantization")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    graph_input = onnx.load_from_string(fp32_model).graph.input[0]
    batch = graph_input.type.tensor_type.shape.dim[0].dim_value or 1
    if calibration_images.ndim != 4 or len(calibration_images) < batch:
        raise ValueError(
            f"calibration_images must be an (N, C, H, W) batch with N >= {batch} (the graph's batch "
            f"size), got {tuple(calibration_images.shape)}"
        )

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            chunks = calibration_images[: len(calibration_images) // batch * batch].split(batch)
            self.feeds = ({graph_input.name: chunk.numpy()} for chunk in chunks)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="selecsls-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(fp32_model)
        # Shape inference and graph clean-up (the step ONNX Runtime recommends before quantizing).
        quant_pre_process(fp32, prepared)
        quantize_static(
            prepared,
            int8,
            _Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        return int8.read_bytes()


def _noise_calibration(example: Tensor) -> Tensor:
    """Gaussian noise shaped like normalised images, for the benchmark's int8 backends: the speed of
    int8 kernels does not depend on the calibration ranges (accuracy does: use ``selecsls export --int8``)."""
    return torch.randn(max(8, len(example)), *example.shape[1:], generator=torch.Generator().manual_seed(0))


def int8_backend(model: nn.Module, example: Tensor) -> Runner:
    """ONNX Runtime int8 (static QDQ) on the model exported at the example's shape, calibrated on noise."""
    return session_runner(onnx_session(quantize_onnx(to_onnx(model.eval(), example), _noise_calibration(example))))


def openvino_int8_backend(model: nn.Module, example: Tensor) -> Runner:
    """OpenVINO int8 (NNCF post-training quantization) on the model converted at the example's shape,
    calibrated on noise."""
    quantized = openvino_ir.quantize_ir(to_openvino(model.eval(), example), _noise_calibration(example))
    return openvino_ir.compiled_runner(quantized)


@dataclass(frozen=True)
class AccuracyComparison:
    """Top-1 of a reference and a candidate model on the same labelled images."""

    images: int
    reference_top1: float  # percent
    candidate_top1: float  # percent
    agreement: float  # percent of images where both predict the same class

    @property
    def drop(self) -> float:
        """Accuracy lost by the candidate, in percentage points (negative: it gained)."""
        return self.reference_top1 - self.candidate_top1

    def __str__(self) -> str:
        return (
            f"{self.images} images: fp32 top-1 {self.reference_top1:.2f}%, int8 top-1 {self.candidate_top1:.2f}% "
            f"(drop {self.drop:+.2f} points), same top-1 class on {self.agreement:.1f}%"
        )


def compare_accuracy(
    reference: Runner, candidate: Runner, batches: Iterable[tuple[Tensor, Tensor]]
) -> AccuracyComparison:
    """Score both models on ``batches`` of (images, targets), e.g. a validation loader."""
    counts = torch.zeros(4, dtype=torch.long)  # images, reference hits, candidate hits, agreements
    with torch.no_grad():
        for images, targets, *_ in batches:
            if len(targets) == 0:
                continue
            ref, cand = reference(images).argmax(1), candidate(images).argmax(1)
            counts += torch.tensor(
                [len(targets), int((ref == targets).sum()), int((cand == targets).sum()), int((ref == cand).sum())]
            )
    images, ref_hits, cand_hits, same = counts.tolist()
    if images == 0:
        raise ValueError("no labelled images to compare accuracy on")
    return AccuracyComparison(images, 100.0 * ref_hits / images, 100.0 * cand_hits / images, 100.0 * same / images)


def export_int8(
    model: nn.Module,
    path: PathLike,
    calibration_images: Tensor,
    evaluation_batches: Iterable[tuple[Tensor, Tensor]],
    *,
    format: str = "onnx",
    dynamic: bool = False,
    images: Tensor | None = None,
    max_drop: float | None = None,
) -> tuple[list[ExportCheck], AccuracyComparison]:
    """Write the int8 ``format`` ('onnx' or 'openvino') model of ``model`` to ``path`` with its accuracy
    cost measured.

    The fp32 export is checked against PyTorch first (as :func:`selecsls.deploy.export.export_model`
    does, on random inputs and ``images``), then quantized with ``calibration_images`` and
    scored against the fp32 PyTorch model on ``evaluation_batches`` of (images, targets).
    With ``max_drop`` (percentage points) a larger top-1 drop raises ValueError and nothing
    is written.
    """
    if format not in INT8_FORMATS:
        raise ValueError(f"int8 export writes one of {INT8_FORMATS}, got {format!r}")
    model.card.require_outputs("int8 export (its accuracy drop is measured)")
    model = model.eval()
    input_size: Sequence[int] = tuple(calibration_images.shape[1:])
    with tempfile.TemporaryDirectory(prefix="selecsls-fp32-") as tmp:
        fp32_path = Path(tmp) / ("fp32.onnx" if format == "onnx" else "fp32.xml")
        checks = export_model(model, fp32_path, format, input_size=input_size, dynamic=dynamic, images=images)
        if format == "onnx":
            int8 = quantize_onnx(fp32_path.read_bytes(), calibration_images)
            run = session_runner(onnx_session(int8))
        else:
            int8 = openvino_ir.quantize_ir(openvino_ir.read_ir(fp32_path), calibration_images)
            run = openvino_ir.compiled_runner(int8)
        comparison = compare_accuracy(model, run if dynamic else one_image_at_a_time(run), evaluation_batches)
        if max_drop is not None and comparison.drop > max_drop:
            raise ValueError(
                f"int8 loses {comparison.drop:.2f} top-1 points (more than --max-drop {max_drop:g}): {comparison}; "
                "calibrate on more or more representative images, or deploy the fp32 model"
            )
        # Written while the fp32 files are still there: OpenVINO may map weights from them.
        if format == "onnx":
            with atomic_path(path) as tmp_path:
                tmp_path.write_bytes(int8)
        else:
            with openvino_ir.staged_ir(path) as tmp_xml:
                openvino_ir.save_ir(int8, tmp_xml)
    return checks, comparison
