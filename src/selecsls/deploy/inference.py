"""Classify image files: load a model, pick an inference backend, report top-k class names.

Any backend of :data:`selecsls.deploy.backends.BACKENDS` that keeps the model's function
runs predictions (see :func:`~selecsls.deploy.backends.predict_backends`); an ``.onnx`` file
exported by ``selecsls export`` runs on ONNX Runtime, an OpenVINO IR (``.xml``) on OpenVINO, an
AOTInductor package (``.pt2``) on PyTorch without the model's code.
``auto`` takes the frozen model (:func:`selecsls.freeze`: BN folded, weights packed once), else
eager (:data:`AUTO_ORDER`; docs/deployment.md has the measurements behind it).
:meth:`Predictor.benchmark` measures the whole pipeline's frame rate: decoding and
preprocessing in threads, overlapped with inference, as a video or camera application runs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, one_line, printable
from selecsls.data.images import UnreadableImageError, open_image
from selecsls.data.transforms import EvalTransform, eval_transform_for
from selecsls.deploy import openvino_ir
from selecsls.deploy.aoti import load_package
from selecsls.deploy.backends import BACKENDS, BackendUnavailable, Runner, predict_backends
from selecsls.deploy.export import one_image_at_a_time, onnx_session, read_metadata, session_runner
from selecsls.models.card import ModelCard
from selecsls.models.compare import check_finite_outputs
from selecsls.models.files import CheckpointError
from selecsls.models.validation import InvalidInput, check_int

__all__ = [
    "PipelineRate",
    "Prediction",
    "Predictor",
    "AUTO_ORDER",
    "class_names",
    "imagenet_class_names",
    "load_images",
]

IMAGENET_CLASSES = 1000


#: What ``backend="auto"`` tries, in order: the frozen model (BN folded, weights packed once: one copy
#: of them, ready in about a second, any image size), else eager (a network ``torch.fx`` cannot trace).
AUTO_ORDER = ("frozen", "eager")


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names in index order (package data)."""
    text = resources.files("selecsls").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def class_names(card: ModelCard) -> list[str]:
    """Names for the model's outputs: the training folder names its card records (``label_names``),
    the ImageNet names for a 1000-class model, else ``class 0``, ``class 1``, ..."""
    if card.label_names is not None:
        return list(card.label_names)
    if card.num_classes == IMAGENET_CLASSES:
        return list(imagenet_class_names())
    return [f"class {i}" for i in range(card.num_classes)]


def load_images(paths: Sequence[PathLike], transform: EvalTransform) -> Tensor:
    """Decode (Pillow) and preprocess image files into one batch; a bad file raises one clear error."""
    if not paths:
        raise ValueError("no images given")
    return torch.stack([transform(open_image(path, transform.draft_size)) for path in paths])


@dataclass(frozen=True)
class Prediction:
    """The ``k`` most likely classes for one image, most likely first; ``error`` if it could not be read."""

    path: str
    classes: tuple[tuple[str, float], ...]  # (class name, probability)
    error: str | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"{printable(self.path)}\n  unreadable: {printable(self.error)}"
        rows = [printable(self.path)] + [
            f"  {rank}. {printable(name):<30} {100 * p:6.2f}%" for rank, (name, p) in enumerate(self.classes, start=1)
        ]
        return "\n".join(rows)


def _runner(backend: str, model: nn.Module, example: Tensor) -> Runner:
    """The backend's runner, taking any batch (a fixed-shape graph runs one image at a time)."""
    run = BACKENDS[backend].build(model, example)
    return one_image_at_a_time(run) if BACKENDS[backend].fixed_shape else run


class Predictor:
    """Image files -> top-k class names, with one model and one backend."""

    def __init__(self, run: Runner, transform: EvalTransform, names: Sequence[str], backend: str) -> None:
        self.run = run
        self.transform = transform
        self.names = list(names)
        self.backend = backend

    @classmethod
    def from_model(cls, model: nn.Module, backend: str = "auto") -> Predictor:
        """Wrap a PyTorch classifier; ``backend`` is ``auto`` or one of :func:`predict_backends`."""
        choices = ["auto", *predict_backends()]
        if backend not in choices:
            raise ValueError(f"backend must be one of {', '.join(choices)}, got {backend!r}")
        card = model.card
        card.require_outputs("predict")
        model = model.eval()
        example = torch.randn(1, *card.preprocessing.input_size, generator=torch.Generator().manual_seed(0))
        transform, names = eval_transform_for(card.preprocessing), class_names(card)
        candidates = AUTO_ORDER if backend == "auto" else (backend,)
        for name in candidates[:-1]:
            try:
                return cls(_runner(name, model, example), transform, names, name)
            except BackendUnavailable as exc:
                warnings.warn(f"{name} backend unavailable ({exc.reason}); trying {candidates[-1]}", stacklevel=2)
        return cls(_runner(candidates[-1], model, example), transform, names, candidates[-1])

    @classmethod
    def from_exported(cls, path: PathLike) -> Predictor:
        """Wrap a file written by ``selecsls export``: ``.onnx`` (ONNX Runtime), an OpenVINO IR ``.xml``
        (OpenVINO) or an AOTInductor package ``.pt2``. Its metadata holds the preprocessing and class
        names; a graph exported at a fixed batch size runs one image at a time."""
        if os.fspath(path).endswith(".pt2"):
            package = load_package(path)
            package.card.require_outputs("predict")
            return cls(package, eval_transform_for(package.card.preprocessing), class_names(package.card), "aoti")
        metadata, shown = read_metadata(path), printable(os.fspath(path))
        if os.fspath(path).endswith(".xml"):
            model = openvino_ir.read_ir(path)
            run, backend = openvino_ir.compiled_runner(model), "openvino"
            classes = model.outputs[0].get_partial_shape()[-1]
            num_classes = classes.get_length() if classes.is_static else None
            fixed_batch = openvino_ir.is_static(model)
        else:
            try:
                session = onnx_session(path)
            except Exception as exc:  # onnxruntime's errors (invalid graph, ...) share no base class
                raise CheckpointError(f"{shown} is not a runnable ONNX model ({one_line(exc)})") from None
            run, backend = session_runner(session), "onnxruntime"
            num_classes = session.get_outputs()[0].shape[-1]
            fixed_batch = isinstance(session.get_inputs()[0].shape[0], int)
        if not isinstance(num_classes, int):
            raise CheckpointError(f"{shown}: its output has no fixed number of classes")
        try:
            card = ModelCard.from_pretrained_cfg(metadata, "exported graph", num_classes=num_classes)
        except InvalidInput as exc:
            raise CheckpointError(f"{shown}: {exc}") from None
        run = one_image_at_a_time(run) if fixed_batch else run
        return cls(run, eval_transform_for(card.preprocessing), class_names(card), backend)

    def predict(self, paths: Sequence[PathLike], topk: int = 5, batch_size: int = 16) -> list[Prediction]:
        """Top-``topk`` classes with softmax probabilities for each image, in input order.

        An unreadable image does not stop the others: its :class:`Prediction` carries the ``error``.
        """
        check_int("topk", topk)
        k = min(topk, len(self.names))
        predictions = []
        for start in range(0, len(paths), batch_size):
            chunk, images, unreadable = paths[start : start + batch_size], [], {}
            for path in chunk:
                try:
                    images.append(self.transform(open_image(path, self.transform.draft_size)))
                except UnreadableImageError as exc:
                    unreadable[os.fspath(path)] = str(exc)
            if images:
                with torch.no_grad():
                    logits = check_finite_outputs(self.run(torch.stack(images)).float(), "these images")
                top = logits.softmax(dim=1).topk(k, dim=1)
                ranked = iter(zip(top.values.tolist(), top.indices.tolist()))
            for path in map(os.fspath, chunk):
                if path in unreadable:
                    predictions.append(Prediction(path, (), unreadable[path]))
                else:
                    values, indices = next(ranked)
                    predictions.append(Prediction(path, tuple((self.names[i], v) for i, v in zip(indices, values))))
        return predictions

    def benchmark(self, paths: Sequence[PathLike], decode_threads: int = 1, prefetch: int = 4) -> PipelineRate:
        """Frames per second of the whole pipeline on ``paths``, one image at a time (a video stream).

        ``decode_threads`` decode (Pillow) and preprocess images while the model runs on earlier
        ones, up to ``prefetch`` images ahead; the clock runs from the first decode to the last
        result. One untimed inference on the first image comes first (allocations, lazy set-up).
        """
        if not paths:
            raise ValueError("no images to benchmark on")
        if decode_threads < 1 or prefetch < 1:
            raise ValueError(f"decode_threads and prefetch must be >= 1, got {decode_threads} and {prefetch}")
        with torch.no_grad():
            self.run(load_images(paths[:1], self.transform))
            inference = 0.0
            with ThreadPoolExecutor(decode_threads, thread_name_prefix="selecsls-decode") as decoders:
                start = time.perf_counter()
                pending: deque = deque()
                for path in paths:
                    pending.append(decoders.submit(load_images, [path], self.transform))
                    if len(pending) > prefetch:
                        inference += self._timed_run(pending.popleft().result())
                while pending:
                    inference += self._timed_run(pending.popleft().result())
                elapsed = time.perf_counter() - start
        return PipelineRate(len(paths), elapsed, inference)

    def _timed_run(self, batch: Tensor) -> float:
        start = time.perf_counter()
        self.run(batch)
        return time.perf_counter() - start


@dataclass(frozen=True)
class PipelineRate:
    """How fast a :class:`Predictor` classified a stream of image files (:meth:`Predictor.benchmark`)."""

    images: int
    seconds: float  # wall time: first decode to last result
    inference_seconds: float  # of which inside the model

    @property
    def frames_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def inference_frames_per_s(self) -> float:
        return self.images / max(self.inference_seconds, 1e-12)

    def __str__(self) -> str:
        limit = "inference" if self.inference_seconds >= 0.9 * self.seconds else "decoding and preprocessing"
        return (
            f"{self.images} images in {self.seconds:.2f} s: {self.frames_per_s:.1f} frames/s end to end "
            f"(decode + preprocess + inference, decoding overlapped with inference); inference alone "
            f"{self.inference_frames_per_s:.1f} frames/s, so {limit} sets the rate"
        )
