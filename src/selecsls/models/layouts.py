"""What a state dict's keys and shapes say: its key layout, converted to ours, and the variant it fits.

Three key layouts exist for the same tensors: the reference implementation
(mehtadushy/SelecSLS-Pytorch: ``stem.0``, ``features.N.convK.0/1``, ``head.N.0/1``,
``classifier.0``), timm (the same, with ``fc``) and ours (``.conv``/``.bn``, ``fc``).
:func:`checkpoint_filter_fn` (timm's name for the job) turns any of them, wrapped
(``{"state_dict": ...}``) or prefixed by DDP or torch.compile, into ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from selecsls._io import printable
from selecsls.models.spec import VARIANTS, ModelSpec
from selecsls.models.validation import CheckpointError

__all__ = [
    "StateDict",
    "check_finite",
    "check_stored",
    "check_weights",
    "checkpoint_filter_fn",
    "conv_weight_shapes",
    "fitting_variants",
    "is_fused",
    "non_finite",
]

StateDict = dict[str, Tensor]

#: Keys under which training scripts nest the model weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema", "ema")
#: Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# "stem.0.weight" / "features.3.conv2.1.running_mean" / "head.1.0.bias": Sequential(conv, bn, relu).
_SEQUENTIAL_KEY = re.compile(r"^(stem|features\.\d+\.conv\d|head\.\d+)\.([01])\.(.+)$")
_REFERENCE_CLASSIFIER_KEY = re.compile(r"^classifier\.0\.(weight|bias)$")


def checkpoint_filter_fn(obj: Mapping[str, Any], source: str = "checkpoint") -> StateDict:
    """The tensors of a checkpoint of any layout under our key names.

    The state dict is found inside wrappers, DDP/compile prefixes are removed and reference/timm keys
    renamed (``X.0`` -> ``X.conv``, ``X.1`` -> ``X.bn``, ``classifier.0`` -> ``fc``).
    """
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
        sequential, classifier = _SEQUENTIAL_KEY.match(key), _REFERENCE_CLASSIFIER_KEY.match(key)
        if sequential:
            layer, index, rest = sequential.groups()
            key = f"{layer}.{'conv' if index == '0' else 'bn'}.{rest}"
        elif classifier:
            key = f"fc.{classifier.group(1)}"
        state[key] = tensor
    return state


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(value, Tensor) for value in obj.values())


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


def check_stored(state: StateDict, source: str) -> None:
    """Refuse tensors a file does not hold as dense data, checked on their metadata before anything reads them.

    A sparse (or other non-strided) tensor is refused with what to do. So is a tensor whose shape needs
    more bytes than its storage has (a zero-stride or expanded view), and tensors needing more bytes
    together than all their storages hold (views sharing one storage): with these a 90 KB file declared
    a 14,000-wide head that the loader then allocated (14 GB). With every tensor backed by stored
    bytes, and the card's shapes checked against them (:func:`check_weights`), what loading allocates is
    bounded by the file's size.
    """
    storages: dict[int, int] = {}
    declared = 0
    for key, tensor in state.items():
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f"{printable(source)}: {key} is a {str(tensor.layout).removeprefix('torch.')} tensor, which selecsls "
                "does not load (only dense tensors); convert it with tensor.to_dense() and save the file again"
            )
        needed, storage = tensor.numel() * tensor.element_size(), tensor.untyped_storage()
        if needed > storage.nbytes():
            raise CheckpointError(
                f"{printable(source)}: {key} has shape {tuple(tensor.shape)} ({needed:,} bytes) but the file stores "
                f"{storage.nbytes():,} bytes of it (a zero-stride or expanded tensor); selecsls loads only tensors "
                "whose data the file holds: save them with tensor.contiguous()"
            )
        storages[storage.data_ptr()] = storage.nbytes()
        declared += needed
    if declared > sum(storages.values()):
        raise CheckpointError(
            f"{printable(source)}: its tensors need {declared:,} bytes but the file stores {sum(storages.values()):,} "
            "(tensors share their data); selecsls loads only tensors whose data the file holds: save each with "
            "tensor.clone()"
        )


def check_weights(state: StateDict, source: str, spec: ModelSpec | None = None, num_classes: int = 0) -> None:
    """Refuse non-finite weights, negative BatchNorm variances and, given the ``spec`` (and classifier size) a
    file declares, weights of other shapes: checked on shapes, before anything is allocated."""
    check_finite(state, source)
    for key, tensor in state.items():
        if key.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CheckpointError(
                f"{printable(source)}: BatchNorm {key.removesuffix('.running_var')} has negative running variances "
                f"(down to {float(tensor.min()):.3g}), which no training produces: the file is damaged or was edited; "
                "re-download it or save it again"
            )
    if spec is None:
        return
    for key, shape in conv_weight_shapes(spec).items():
        stored = state.get(key)
        if stored is None or tuple(stored.shape) != shape:
            found = "missing" if stored is None else tuple(stored.shape)
            raise CheckpointError(
                f"{source}: the saved model description does not match its weights: {key} should be {shape}, is {found}"
            )
    classifier = state.get("fc.weight")
    found = tuple(classifier.shape) if classifier is not None else "missing"
    if num_classes and found != (num_classes, spec.num_features):
        raise CheckpointError(
            f"{source}: the saved model description declares {num_classes} classes but its classifier "
            f"fc.weight is {found}"
        )


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
