"""AOTInductor packages (``.pt2``): a model compiled ahead of time, run by PyTorch without the model's code.

``torch.export`` captures the network's graph and ``torch._inductor.aoti_compile_and_package``
compiles it into a shared library holding the weights, frozen (:data:`INDUCTOR_CONFIGS`:
BatchNorm folded, each conv weight laid out for oneDNN once, at compile time).
``torch._inductor.aoti_load_package`` runs it: no selecsls, no Python model code, no
TorchScript. The package carries the model card as the other exports do: the ``pretrained_cfg``
(preprocessing at the export size, class names) in its AOTInductor metadata, next to the
parameter count and MACs the benchmark reports.

A package is compiled for one input: a batch of one image at the export size, on the CPU it was
compiled on (the library uses that CPU's instruction set). AOTInductor does not check the shape
of what it is given (a batch of two returns one row; a larger image is read out of bounds), so
:class:`PackagedModel` checks every input and runs a batch one image at a time.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, one_line, printable
from selecsls.deploy.backends import BackendUnavailable
from selecsls.models.card import ModelCard
from selecsls.models.complexity import count_macs, count_params
from selecsls.models.files import CheckpointError
from selecsls.models.validation import InvalidInput

__all__ = ["CARD_KEY", "INDUCTOR_CONFIGS", "PackagedModel", "compile_package", "load_package", "quiet_torch_internals"]

#: Inductor settings of every package: weights become constants, so BatchNorm folds into the convs
#: and the conv weights are prepacked once (the ``compile`` backend uses the same setting and says why).
INDUCTOR_CONFIGS = {"freezing": True}
#: Metadata keys: the ``pretrained_cfg`` (JSON, as ONNX and OpenVINO files carry it) and the network's size.
CARD_KEY, PARAMS_KEY, MACS_KEY = "selecsls.pretrained_cfg", "selecsls.params", "selecsls.macs"
#: The name AOTInductor gives the one model of a package.
MODEL_NAME = "model"


@contextmanager
def quiet_torch_internals() -> Iterator[None]:
    """torch.export's own pytree code warns (FutureWarning, LeafSpec) about itself on every export:
    noise to users, and nothing our calls can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        yield


def compile_package(model: nn.Module, example: Tensor, pretrained_cfg: str) -> bytes:
    """``model`` compiled for inputs shaped like ``example`` (batch 1), as the bytes of a ``.pt2`` package
    carrying ``pretrained_cfg`` (JSON). Compiling a full network takes tens of seconds (a C++ build)."""
    if example.shape[0] != 1:
        raise ValueError(f"a package is compiled for one image at a time; the example has batch {example.shape[0]}")
    training = model.training
    model.eval()
    metadata = {
        CARD_KEY: pretrained_cfg,
        PARAMS_KEY: str(count_params(model)),
        MACS_KEY: str(count_macs(model, tuple(example.shape))),
    }
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), quiet_torch_internals():
            program = torch.export.export(model, (example,))
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=buffer,
                inductor_configs={**INDUCTOR_CONFIGS, "aot_inductor.metadata": metadata},
            )
    finally:
        model.train(training)  # the caller's model keeps its mode
    return buffer.getvalue()


class PackagedModel(nn.Module):
    """A loaded package: its compiled forward behind an input check, with the card it was exported with.

    A module so that evaluation and the benchmark take it like any model. It holds no Parameters
    (the weights are constants inside the compiled library) and runs inference only.
    """

    def __init__(self, loader, card: ModelCard, params: int, macs: int, source: str) -> None:
        super().__init__()
        self.loader, self.card, self.params, self.macs, self.source = loader, card, params, macs, source
        self.num_classes = card.num_classes
        self.image_shape = tuple(card.preprocessing.input_size)
        self.training = False

    def train(self, mode: bool = True) -> PackagedModel:
        if mode:
            raise RuntimeError(
                f"{printable(self.source)} is a compiled package: it runs inference only; "
                "train (or fine-tune) the checkpoint it was exported from"
            )
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.dtype != torch.float32:
            raise InvalidInput(
                f"{printable(self.source)} was compiled for float32 images of shape {self.image_shape} "
                f"(channels, height, width), got {images.dtype} {tuple(images.shape)}; preprocess to its "
                "input size, or export the model again at this size (selecsls export --img-size)"
            )
        if images.device.type != "cpu":
            raise InvalidInput(f"{printable(self.source)} runs on the CPU; got images on {images.device}")
        return torch.cat([self._run(image[None].contiguous()) for image in images])

    def _run(self, image: Tensor) -> Tensor:
        outputs = self.loader.run([image])
        if len(outputs) != 1:
            raise CheckpointError(f"{printable(self.source)} returns {len(outputs)} tensors, not one")
        return outputs[0]

    def check_runnable(self, backend: str, example: Tensor) -> None:
        """Raise :class:`BackendUnavailable` unless the benchmark can time the package with ``backend`` on
        ``example``: it runs as compiled (its eager row), on the CPU, at its one image size."""
        if backend != "eager":
            raise BackendUnavailable(f"a compiled package runs as compiled (its eager row), not on {backend}")
        if tuple(example.shape[1:]) != self.image_shape or example.device.type != "cpu":
            raise BackendUnavailable(f"the package was compiled for {self.image_shape} images on the CPU")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its file (a process measuring memory loads it again): the compiled code is not data."""
        return load_package, (self.source,)


def _metadata_int(metadata: dict[str, str], key: str, shown: str) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        raise CheckpointError(f"{shown}: its {key} metadata is missing or not an integer") from None


#: How torch tells whether this CPU has each instruction set a package may be compiled for (AOTI_CPU_ISA).
_CPU_HAS = {
    "avx2": lambda: torch.cpu._is_avx2_supported(),
    "avx512": lambda: torch.cpu._is_avx512_supported(),
    "avx512_vnni": lambda: torch.cpu._is_vnni_supported(),
    "amx_tile": lambda: torch.cpu._is_amx_tile_supported(),
}


def _check_machine(metadata: dict[str, str], shown: str) -> None:
    """Refuse a package compiled for another platform or for instructions this CPU lacks (loading it would
    crash the process), naming both machines."""
    here = {"AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": platform.machine()}
    isa = metadata.get("AOTI_CPU_ISA", "").lower().split()
    missing = [flag for flag in isa if flag in _CPU_HAS and not _CPU_HAS[flag]()]
    if missing or any(metadata.get(key, value) != value for key, value in here.items()):
        built = " ".join(metadata.get(key, "?") for key in (*here, "AOTI_CPU_ISA"))
        raise CheckpointError(
            f"{shown} was compiled for another machine ({built}; this one is {' '.join(here.values())}"
            f"{', without ' + ', '.join(missing) if missing else ''}); export it again on this machine"
        )


def load_package(path: PathLike) -> PackagedModel:
    """The package at ``path`` (written by ``selecsls export --format aoti``), run once on zeros to prove
    it loads and gives what its card says (one score per class, or the pooled features of a network without
    a classifier); any other file is one :class:`CheckpointError` naming it.

    Loaded with the C++ loader that ``torch._inductor.aoti_load_package`` wraps: that function first probes
    the CPU by compiling and loading test programs in child processes (seconds, on every load) only to
    warn about a mismatch, which :func:`_check_machine` refuses cheaply instead. The first output comes
    in milliseconds after ``import torch``.
    """
    shown = printable(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AOTInductor package {shown} does not exist or is not a regular file")
    loader = torch._C._aoti.AOTIModelPackageLoader
    try:
        metadata = loader.load_metadata_from_package(os.fspath(path), MODEL_NAME)
    except Exception as exc:  # the C++ loader's errors share no base class
        raise CheckpointError(f"{shown} is not an AOTInductor package ({one_line(exc)})") from None
    if CARD_KEY not in metadata:
        raise CheckpointError(
            f"{shown} was not exported by selecsls (no {CARD_KEY} metadata); "
            "export it with `selecsls export --format aoti` or pass the PyTorch checkpoint"
        )
    try:
        cfg = json.loads(metadata[CARD_KEY])
        card = ModelCard.from_pretrained_cfg(cfg, "exported graph", num_classes=cfg["num_classes"])
    except (json.JSONDecodeError, KeyError, TypeError, InvalidInput) as exc:
        raise CheckpointError(f"{shown}: its {CARD_KEY} metadata is not a valid model card ({exc})") from None
    params, macs = (_metadata_int(metadata, key, shown) for key in (PARAMS_KEY, MACS_KEY))
    _check_machine(metadata, shown)
    try:
        compiled = loader(os.fspath(path), MODEL_NAME, False, 1, -1)  # not single-threaded, 1 runner, CPU
    except Exception as exc:
        raise CheckpointError(f"{shown} is not a loadable AOTInductor package ({one_line(exc)})") from None
    model = PackagedModel(compiled, card, params, macs, os.fspath(path))
    with torch.no_grad():
        scores = model(torch.zeros(1, *model.image_shape))
    if scores.dim() != 2 or (card.num_classes and scores.shape[1] != card.num_classes):
        raise CheckpointError(
            f"{shown} gives outputs of shape {tuple(scores.shape)}, not the {card.num_classes} scores its card names"
        )
    return model
