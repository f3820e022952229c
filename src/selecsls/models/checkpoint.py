"""Read checkpoints of any SelecSLS layout safely and load them into a model.

Three key layouts exist for the same tensors: the reference implementation
(mehtadushy/SelecSLS-Pytorch: ``stem.0``, ``features.N.convK.0/1``, ``head.N.0/1``,
``classifier.0``), timm (the same, with ``fc``) and ours (``.conv``/``.bn``, ``fc``).
Files are read with ``weights_only=True`` (or as safetensors), so loading never runs
pickled code; wrappers (``{"state_dict": ...}``) and DDP/compile prefixes are removed.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import PathLike, one_line, printable
from selecsls._optional import require
from selecsls.models.spec import VARIANTS, ModelSpec

__all__ = [
    "CheckpointError",
    "convert_layout",
    "fitting_variants",
    "build_args_of",
    "check_finite",
    "non_finite",
    "is_fused",
    "load_checkpoint",
    "read_file",
    "read_state_dict",
]

StateDict = dict[str, Tensor]

#: Keys under which training scripts nest the model weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "ema")
#: Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# "stem.0.weight" / "features.3.conv2.1.running_mean" / "head.1.0.bias": Sequential(conv, bn, relu).
_SEQUENTIAL_KEY = re.compile(r"^(stem|features\.\d+\.conv\d|head\.\d+)\.([01])\.(.+)$")
_REFERENCE_CLASSIFIER_KEY = re.compile(r"^classifier\.0\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------- reading
def read_file(path: PathLike) -> dict[str, Any]:
    """The object stored in ``path``, read without executing any pickled code.

    A ``.safetensors`` file becomes ``{"state_dict": tensors, **metadata}``, the same shape
    as a torch file holding a wrapped state dict. Whatever the file holds (text, random
    bytes, a truncated or bit-flipped checkpoint), failure is one :class:`CheckpointError`
    naming the file and the cause.
    """
    path = Path(path)
    shown = printable(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {shown} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {shown} is a directory; give the model file inside it (e.g. best.pt)")
    if not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"checkpoint {shown} is not a regular file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, shown)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(shown, str(exc))) from None
    except EOFError:
        raise CheckpointError(f"{shown} is empty or truncated, not a PyTorch checkpoint") from None
    except Exception as exc:  # a damaged file makes torch's reader fail in any way
        raise CheckpointError(f"{shown} is not a readable PyTorch checkpoint ({one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{shown} holds a {type(obj).__name__}, not a state dict or a dict wrapping one")
    return obj


def _read_safetensors(path: Path, shown: str) -> dict[str, Any]:
    safe_open = require("safetensors", "to read .safetensors files").safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {**(handle.metadata() or {}), "state_dict": tensors}
    except Exception as exc:  # SafetensorError, or a header that overflows or does not parse
        raise CheckpointError(f"{shown} is not a valid safetensors file ({one_line(exc)})") from None


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


def unwrap_state_dict(obj: Mapping[str, Any], source: str = "checkpoint") -> StateDict:
    """The tensors of a state dict, found inside wrappers and with DDP/compile prefixes removed."""
    while not _is_state_dict(obj):
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            shown = ", ".join(sorted(map(str, obj))[:8])
            raise CheckpointError(
                f"no state dict found in {source}: its top-level keys are [{shown}]; expected tensors or a dict "
                f"under one of {', '.join(WRAPPER_KEYS)}"
            )
        obj = inner
    state = {}
    for key, tensor in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"the state dict in {source} has a non-text key {key!r:.40}")
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = tensor
    return state


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(value, Tensor) for value in obj.values())


def convert_layout(state: Mapping[str, Tensor]) -> StateDict:
    """Rename reference/timm keys to ours (``X.0`` -> ``X.conv``, ``X.1`` -> ``X.bn``, classifier -> fc)."""
    converted = {}
    for key, tensor in state.items():
        sequential = _SEQUENTIAL_KEY.match(key)
        classifier = _REFERENCE_CLASSIFIER_KEY.match(key)
        if sequential:
            layer, index, rest = sequential.groups()
            key = f"{layer}.{'conv' if index == '0' else 'bn'}.{rest}"
        elif classifier:
            key = f"fc.{classifier.group(1)}"
        converted[key] = tensor
    return converted


def read_state_dict(path_or_state: PathLike | Mapping[str, Any]) -> StateDict:
    """A checkpoint file (or loaded object) of any supported layout -> a state dict with our key names."""
    if isinstance(path_or_state, Mapping):
        return convert_layout(unwrap_state_dict(path_or_state))
    return convert_layout(unwrap_state_dict(read_file(path_or_state), str(path_or_state)))


# --------------------------------------------------------------- architecture
def is_fused(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` (our key names) holds BN-folded weights: convs with a bias, no BatchNorm."""
    return "stem.conv.bias" in state


def conv_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Expected conv weight shape of every layer of ``spec`` (our key names)."""
    return {f"{layer}.conv.weight": (cout, cin, k, k) for layer, cin, cout, k in spec.conv_layers()}


def fitting_variants(state: Mapping[str, Tensor]) -> list[str]:
    """Published variants whose conv shapes match ``state`` (input channels of the stem may differ)."""
    convs = {key: tuple(t.shape) for key, t in state.items() if key.endswith(".conv.weight")}
    fits = []
    for name, spec in VARIANTS.items():
        expected = conv_weight_shapes(spec)
        if expected.keys() == convs.keys() and all(
            convs[key][0] == shape[0]
            and convs[key][2:] == shape[2:]
            and (key == "stem.conv.weight" or convs[key] == shape)
            for key, shape in expected.items()
        ):
            fits.append(name)
    return fits


# --------------------------------------------------------------------- loading
def load_checkpoint(
    model: nn.Module,
    path_or_state: PathLike | Mapping[str, Any],
    strict: bool = True,
    *,
    source: str | None = None,
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load weights of any supported layout into ``model`` (a :class:`selecsls.SelecSLS`).

    A different classifier size keeps the loaded backbone and the model's fresh classifier
    (with a warning); a model without classifier ignores the checkpoint's. A stem for
    another number of input channels is adapted (summed for 1 channel, else tiled and
    rescaled) with a warning. Anything else that does not fit raises one
    :class:`CheckpointError` listing the first offending keys and the variant that fits;
    with ``strict=False`` the fitting tensors are loaded and the rest reported like
    ``load_state_dict`` does. ``source`` names an already read state dict in messages.
    """
    if source is None:
        source = "state dict" if isinstance(path_or_state, Mapping) else os.fspath(path_or_state)
    state = read_state_dict(path_or_state)
    check_finite(state, source)
    state, classifier_note = _fit_classifier(model, state)
    state, stem_note = _fit_stem(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if strict and (missing or unexpected or wrong_shape):
        raise CheckpointError(_mismatch_message(model, state, source, missing, unexpected, wrong_shape, expected))
    for note in filter(None, (classifier_note, stem_note)):
        warnings.warn(f"{source}: {note}", stacklevel=2)
    loadable = {k: v for k, v in state.items() if k in expected and k not in wrong_shape}
    loaded = model.load_state_dict(loadable, strict=False)
    return type(loaded)(loaded.missing_keys, unexpected + wrong_shape)


def non_finite(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN or infinity."""
    return [key for key, tensor in state.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run): they only ever produce NaN outputs."""
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{printable(source)} holds non-finite weights (NaN or infinity in {bad[0]}{more}): the run that wrote it "
            "diverged; use an earlier checkpoint or retrain with a lower learning rate"
        )


def _fit_classifier(model: nn.Module, state: StateDict) -> tuple[StateDict, str | None]:
    """Drop a classifier the model does not have or that has another number of classes (with a note)."""
    classifier_keys = [k for k in state if k.startswith("fc.")]
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        return {k: v for k, v in state.items() if k not in classifier_keys}, None
    saved = state.get("fc.weight")
    # Another number of classes is expected when fine-tuning; another input width is a
    # different backbone, reported with the other mismatches.
    if saved is not None and saved.shape[0] == model.fc.out_features:
        return state, None
    kept = {k: v for k, v in state.items() if k not in classifier_keys}
    kept.update({f"fc.{name}": p.detach() for name, p in model.fc.named_parameters()})
    saved_classes = "no" if saved is None else saved.shape[0]
    return kept, (
        f"checkpoint has {saved_classes} classifier outputs, the model {model.fc.out_features}: "
        "backbone loaded, classifier freshly initialised (train it before use)"
    )


def _fit_stem(model: nn.Module, state: StateDict) -> tuple[StateDict, str | None]:
    """Adapt a stem conv made for another number of input channels (with a note)."""
    saved = state.get("stem.conv.weight")
    own = model.stem.conv.weight
    if saved is None or saved.dim() != 4 or saved.shape[1] == own.shape[1] or saved.shape[0] != own.shape[0]:
        return state, None
    saved_chans, in_chans = saved.shape[1], own.shape[1]
    if in_chans == 1:
        adapted, how = saved.sum(dim=1, keepdim=True), "summed over its input channels"
    else:
        # Tile and rescale: a grey image spread over all channels then gives the response
        # the checkpoint gave for it (exactly when in_chans is a multiple of saved_chans).
        repeats = -(-in_chans // saved_chans)
        adapted = saved.repeat(1, repeats, 1, 1)[:, :in_chans] * (saved_chans / in_chans)
        how = "tiled over the input channels and rescaled"
    note = f"checkpoint stem reads {saved_chans} input channels, the model {in_chans}: stem weights {how}"
    return {**state, "stem.conv.weight": adapted}, note


def _mismatch_message(
    model: nn.Module,
    state: StateDict,
    source: str,
    missing: list[str],
    unexpected: list[str],
    wrong_shape: list[str],
    expected: Mapping[str, Tensor],
    shown: int = 3,
) -> str:
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" (+{len(keys) - shown} more)" if len(keys) > shown else "")

    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {first(unexpected)}")
    if wrong_shape:
        shapes = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong_shape]
        parts.append(f"{len(wrong_shape)} with wrong shape: {first(shapes)}")
    return f"{source} does not fit {name} ({'; '.join(parts)}); {_fix_hint(model, state)}"


def _fix_hint(model: nn.Module, state: StateDict) -> str:
    fits = fitting_variants(state)
    name = getattr(getattr(model, "spec", None), "name", None)
    hints = []
    if not fits:
        hints.append(
            "no published variant fits its shapes; a pruned or custom model saved by selecsls.save, selecsls prune "
            "or training is rebuilt by selecsls.load(path)"
        )
    elif name not in fits:
        hints.append(f"its shapes fit {' / '.join(fits)}: build that variant (create_model({fits[0]!r}, ...))")
    if is_fused(state) != bool(getattr(model, "fused", False)):
        hints.append(
            f"the checkpoint is {'' if is_fused(state) else 'not '}BN-fused: build with fused={is_fused(state)}"
        )
    return "; ".join(hints) or f"its conv shapes fit {name}: only the keys listed differ"


def build_args_of(state: StateDict) -> dict[str, Any]:
    """The create_model arguments a plain state dict implies: fused, input channels, classes."""
    args: dict[str, Any] = {"fused": is_fused(state)}
    stem = state.get("stem.conv.weight")
    if stem is not None and stem.dim() == 4:
        args["in_chans"] = stem.shape[1]
    if "fc.weight" in state:
        args["num_classes"] = state["fc.weight"].shape[0]
    return args
