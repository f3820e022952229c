"""OpenVINO primitives: ONNX -> OpenVINO model, IR files (.xml + .bin), a CPU runner, NNCF int8.

Two settings keep OpenVINO exact (measured on selecsls60, relative to the PyTorch output):

- ``INFERENCE_PRECISION_HINT: f32``. On CPUs with AVX512-BF16 or AMX the CPU plugin runs fp32
  models in bf16 by default: 5.9e-3 error, far above the export tolerance of 1e-4 (f32: 1e-6).
- ``save_model(..., compress_to_fp16=False)``. By default the IR stores weights in fp16: 5.2e-4.

Models are converted from the package's ONNX export (``selecsls.deploy.export.to_onnx``), not from
PyTorch directly: the outputs are identical, conversion is 3-5x faster (no ``torch.jit.trace``)
and the graph keeps the ONNX names ``input`` and ``logits``. ``openvino`` and ``nncf`` are
optional (the ``openvino`` extra): they are imported inside the functions with
:func:`selecsls._optional.require`, so a missing one is one line naming the extra (and a skipped backend).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from selecsls._io import PathLike, atomic_paths
from selecsls._optional import require
from selecsls.deploy.backends import Runner

__all__ = [
    "compile_config",
    "compiled_runner",
    "from_onnx",
    "ir_files",
    "ir_metadata",
    "quantize_ir",
    "read_ir",
    "save_ir",
    "staged_ir",
]

#: Where the model's ``pretrained_cfg`` (JSON) lives in the IR's runtime info.
METADATA_PATH = ["selecsls", "pretrained_cfg"]


def _openvino():
    return require("openvino", "to run or write OpenVINO models", extra="openvino")


@lru_cache(maxsize=1)
def _core():
    return _openvino().Core()


def compile_config(threads: int | None = None) -> dict[str, Any]:
    """CPU plugin settings: one inference at a time (latency), fp32 kept fp32 (module docstring)."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": "f32",
    }


def from_onnx(onnx_model: bytes, metadata: str):
    """The ``openvino.Model`` of a serialised ONNX model, carrying ``metadata`` (the JSON ``pretrained_cfg``)."""
    model = _openvino().convert_model(io.BytesIO(onnx_model))
    model.set_rt_info(metadata, METADATA_PATH)
    return model


def is_static(model) -> bool:
    """Whether the model's input shape is fixed (then it runs one image at a time)."""
    return model.inputs[0].get_partial_shape().is_static


def compiled_runner(model, threads: int | None = None) -> Runner:
    """``model`` (an ``openvino.Model``) compiled for the CPU plugin, as a function Tensor -> Tensor."""
    request = _core().compile_model(model, "CPU", compile_config(threads)).create_infer_request()
    # infer() returns copies of the outputs (share_outputs=False), safe to keep across calls.
    return lambda x: torch.from_numpy(request.infer([x.numpy()])[0])


def ir_files(path: PathLike) -> tuple[Path, Path]:
    """(NAME.xml, NAME.bin) of an IR path; a path not ending in .xml is one clear error."""
    xml = Path(path)
    if xml.suffix != ".xml":
        raise ValueError(
            f"an OpenVINO IR is two files, NAME.xml and NAME.bin: give a path ending in .xml, got {os.fspath(path)!r}"
        )
    return xml, xml.with_suffix(".bin")


@contextlib.contextmanager
def staged_ir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary .xml to :func:`save_ir` to (and check); ``path`` (.xml) and its .bin land
    together only if the block succeeds (:func:`selecsls._io.atomic_paths`)."""
    xml, weights = ir_files(path)
    with atomic_paths(weights, xml) as (_, staged_xml):
        yield staged_xml


def save_ir(model, xml: PathLike) -> None:
    """Write ``model`` as ``xml`` + its .bin with fp32 weights kept fp32 (module docstring)."""
    _openvino().save_model(model, os.fspath(xml), compress_to_fp16=False)


def read_ir(path: PathLike):
    """The ``openvino.Model`` of an IR written by :func:`save_ir` (its .bin beside it)."""
    xml, weights = ir_files(path)
    missing = [os.fspath(p) for p in (xml, weights) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"OpenVINO IR file(s) {missing} do not exist (an IR is NAME.xml with NAME.bin)")
    return _core().read_model(xml)


def ir_metadata(model, source: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` stored by :func:`from_onnx`; ``source`` names the file in the error."""
    if not model.has_rt_info(METADATA_PATH):
        raise ValueError(
            f"{source!r} was not exported by selecsls (no {'.'.join(METADATA_PATH)} runtime info); "
            "export it with `selecsls export --format openvino` or pass the PyTorch checkpoint"
        )
    return json.loads(model.get_rt_info(METADATA_PATH).astype(str))


def quantize_ir(model, calibration_images: Tensor):
    """The int8 version of ``model`` by NNCF post-training quantization, calibrated on ``calibration_images``.

    NNCF's CPU preset (symmetric per-channel int8 weights, int8 activations with signedness from
    the calibration statistics) with two changes measured on the test suite's Fashion-MNIST model
    (top-1 agreement with fp32 on 500 validation images): activation ranges from the calibration
    minimum and maximum, as ONNX Runtime's quantizer does, instead of NNCF's outlier-clipping
    estimate, and no fast bias correction (fitted to the few calibration images). NNCF's defaults:
    66% agreement, 7.2 points top-1 lost; without the bias correction: 87%, 2.2 points; both
    changes: 94%, 0.2 points. ``calibration_images`` (N, C, H, W) are preprocessed as at inference
    and fed in batches of the model's fixed batch size (1 if dynamic).
    NNCF's log and progress bars are silenced.
    """
    nncf = require("nncf", "to quantize OpenVINO models", extra="openvino")
    shape = model.inputs[0].get_partial_shape()
    batch = shape[0].get_length() if shape[0].is_static else 1
    if calibration_images.ndim != 4 or len(calibration_images) < batch:
        raise ValueError(
            f"calibration_images must be an (N, C, H, W) batch with N >= {batch} (the model's batch size), "
            f"got {tuple(calibration_images.shape)}"
        )
    chunks = [chunk.numpy() for chunk in calibration_images[: len(calibration_images) // batch * batch].split(batch)]
    min_max = nncf.quantization.range_estimator.RangeEstimatorParametersSet.MINMAX
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # rich progress bars print to sys.stdout
            return nncf.quantize(
                model,
                nncf.Dataset(chunks),
                subset_size=len(chunks),
                fast_bias_correction=False,
                advanced_parameters=nncf.AdvancedQuantizationParameters(activations_range_estimator_params=min_max),
            )
    finally:
        nncf_logger.setLevel(level)
