"""Model files on disk: any of them read without running pickled code and identified, the package's own
written atomically.

A file the package writes holds the model's card as JSON text (:mod:`~selecsls.models.card`) next to
its ``"state_dict"`` tensors: under ``"selecsls"`` for a SelecSLS network, as ``"baseline"`` (the name)
and ``"pretrained_cfg"`` for a baseline. A ``.safetensors`` path keeps the same entries in the file's
metadata. Training checkpoints add their own entries to the same payload (``{**to_payload(model),
"optimizer": ...}``), so every loader reads them.

Each such file also carries the sha256 of its content (:func:`content_hash`: the card's text and
every tensor's name, dtype, shape and bytes) under :data:`HASH_KEY`, and :func:`identify` refuses a
file whose content no longer matches it ("file is damaged"): a flipped bit in the weights would
otherwise load as a silently different model. Files without a hash (other tools' state dicts,
release 0.1's files) load as before, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import OutputError, PathLike, atomic_path, atomic_write, one_line, printable
from selecsls._optional import require
from selecsls.models.card import CARD_KEYS, ModelCard
from selecsls.models.layouts import StateDict, check_stored, check_weights, checkpoint_filter_fn, is_fused
from selecsls.models.spec import ModelSpec
from selecsls.models.validation import CheckpointError, InvalidInput

__all__ = [
    "HASH_KEY",
    "MODEL_FILE_SUFFIXES",
    "CheckpointError",
    "ModelFile",
    "content_hash",
    "identify",
    "read_file",
    "read_model_file",
    "read_state_dict",
    "save",
    "to_payload",
]

#: Key of the content hash (:func:`content_hash`) in a file the package writes, beside its card.
HASH_KEY = "content_sha256"
#: Endings of the model files commands take where they also take a variant's name (bench, info).
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".safetensors")


def read_file(path: PathLike) -> dict[str, Any]:
    """The object stored in ``path``, read without executing any pickled code.

    A ``.safetensors`` file becomes ``{"state_dict": tensors, **metadata}``, the same shape
    as a torch file holding a wrapped state dict. Whatever the file holds (text, random
    bytes, a truncated or bit-flipped checkpoint), failure is one :class:`CheckpointError`
    naming the file and the cause.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {printable(path)} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {printable(path)} is a directory; give the model file inside it (e.g. best.pt)"
        )
    if not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"checkpoint {printable(path)} is not a regular file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(printable(path), str(exc))) from None
    except EOFError:
        raise CheckpointError(f"{printable(path)} is empty or truncated, not a PyTorch checkpoint") from None
    except Exception as exc:  # a damaged file makes torch's reader fail in any way
        raise CheckpointError(f"{printable(path)} is not a readable PyTorch checkpoint ({one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{printable(path)} holds a {type(obj).__name__}, not a state dict or a dict wrapping one"
        )
    return obj


def _read_safetensors(path: Path) -> dict[str, Any]:
    safe_open = require("safetensors", "to read .safetensors files").safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {**(handle.metadata() or {}), "state_dict": tensors}
    except Exception as exc:  # SafetensorError, or a header that overflows or does not parse
        raise CheckpointError(f"{printable(path)} is not a valid safetensors file ({one_line(exc)})") from None


def _unpickling_message(shown: str, error: str) -> str:
    """Tell a file that needs pickled code (refused) from one that is not a checkpoint at all.

    torch words the refusal two ways: "Unsupported global: GLOBAL x.y was not an allowed global"
    and, for blocked modules, "Trying to load unsupported GLOBAL x.y whose module x is blocked".
    """
    refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", error)
    if refused:
        return (
            f"{shown} stores pickled Python objects ({refused.group(1)}), which selecsls refuses to load because "
            "unpickling can run arbitrary code. If you trust the file, re-save only its tensors: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth'), "
            "or convert it to .safetensors"
        )
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", error)
    return f"{shown} is not a readable PyTorch checkpoint ({one_line(reason.group(1) if reason else error)})"


@dataclass(frozen=True)
class ModelFile:
    """What a model file holds: its weights (our key names), whether they are BN-folded and, for a file the
    package wrote, its card and the content hash it was verified against (None: a file without one)."""

    source: str
    state: StateDict
    fused: bool
    card: ModelCard | None
    content_hash: str | None = None


def read_model_file(path: PathLike) -> ModelFile:
    """Steps 1 and 2 of loading (:mod:`selecsls.models.loading`): the file read and identified."""
    return identify(read_file(path), os.fspath(path))


def identify(obj: Mapping[str, Any], source: str) -> ModelFile:
    """The weights and card of an object read from a model file; any problem is one CheckpointError.

    In order: the tensors must hold the data their shapes need (so reading them allocates no more than
    the file holds), the content must match the hash it was saved with, then the card and the weights
    must be valid and fit each other.
    """
    state = checkpoint_filter_fn(obj, source)
    check_stored(state, source)
    verified = _verified_hash(obj, source)
    try:
        card = ModelCard.from_entries(obj)
    except InvalidInput as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    file = ModelFile(source, state, is_fused(state), card, verified)
    if card is not None and isinstance(card.architecture, ModelSpec):
        check_weights(state, source, card.architecture, card.num_classes)
    else:
        check_weights(state, source)
    return file


def content_hash(state: Mapping[str, Tensor], card_entries: Mapping[str, str]) -> str:
    """The sha256 of a model file's content, the same whichever format stores it: the card's entries,
    then each tensor's name, dtype, shape and bytes, in sorted order, every piece length-prefixed so no
    two contents serialise alike. About 0.2 s for selecsls60's 123 MB of weights."""
    digest = hashlib.sha256()

    def piece(data: Any) -> None:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    for key in sorted(card_entries):
        piece(key.encode("utf-8", "surrogatepass"))
        piece(card_entries[key].encode("utf-8", "surrogatepass"))
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        piece(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        piece(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _verified_hash(obj: Mapping[str, Any], source: str) -> str | None:
    """The content hash ``obj`` carries once its content is checked against it; None if it carries none."""
    stored = obj.get(HASH_KEY)
    if stored is None:
        return None
    state, entries = obj.get("state_dict"), {key: obj[key] for key in CARD_KEYS if key in obj}
    intact = (
        isinstance(stored, str)
        and isinstance(state, Mapping)
        and all(isinstance(tensor, Tensor) for tensor in state.values())
        and all(isinstance(text, str) for text in entries.values())
        and content_hash(state, entries) == stored
    )
    if not intact:
        raise CheckpointError(
            f"file is damaged: the weights or model description in {printable(source)} no longer match the content "
            "hash they were saved with; re-download the file, or save it again from the model it came from"
        )
    return stored


def read_state_dict(path_or_state: PathLike | Mapping[str, Any]) -> StateDict:
    """A checkpoint file (or loaded object) of any supported layout -> a state dict with our key names, identified
    as every model file is (:func:`identify`: stored bytes, content hash, card, finite weights)."""
    if isinstance(path_or_state, Mapping):
        return identify(path_or_state, "state dict").state
    return read_model_file(path_or_state).state


def to_payload(model: nn.Module) -> dict[str, Any]:
    """The entries of a model file for ``model`` (built by the package): its card as JSON, its CPU tensors and
    their content hash."""
    card = model.__dict__.get("card")
    if not isinstance(card, ModelCard):
        raise TypeError(f"selecsls.save stores SelecSLS models, got {type(model).__name__} (build with create_model)")
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    entries = card.entries()
    return {**entries, "state_dict": state, HASH_KEY: content_hash(state, entries)}


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model`` to ``path`` (atomically): ``.safetensors`` or a weights-only torch file."""
    payload = to_payload(model)
    if os.fspath(path).endswith(".safetensors"):
        save_file = require("safetensors.torch", "to write .safetensors files").save_file
        SafetensorError = require("safetensors", "to write .safetensors files").SafetensorError
        metadata = {key: value for key, value in payload.items() if key != "state_dict"}
        with atomic_path(path) as tmp:
            try:
                save_file(payload["state_dict"], str(tmp), metadata=metadata)
            except SafetensorError as exc:  # safetensors reports a full disk as its own error type
                raise OutputError(f"cannot write {os.fspath(path)}: {exc} (nothing was written)") from exc
    else:
        with atomic_write(path) as handle:
            torch.save(payload, handle)
