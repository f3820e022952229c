"""Load weights into a SelecSLS network, adapting the stem and the classifier, or say clearly why they do not fit."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import PathLike
from selecsls.models.files import identify, read_model_file
from selecsls.models.layouts import StateDict, fitting_variants, is_fused
from selecsls.models.validation import CheckpointError

__all__ = ["load_checkpoint", "load_state"]


def load_checkpoint(
    model: nn.Module, path_or_state: PathLike | Mapping[str, Any], strict: bool = True
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load a checkpoint of any supported layout (a file or a loaded object) into ``model``; see :func:`load_state`.

    It is read and checked as every model file is (:func:`~selecsls.models.files.identify`).
    """
    if isinstance(path_or_state, Mapping):
        file = identify(path_or_state, "state dict")
    else:
        file = read_model_file(path_or_state)
    return load_state(model, file.state, strict, source=file.source)


def load_state(
    model: nn.Module, state: StateDict, strict: bool = True, *, source: str = "state dict"
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load ``state`` (our key names) into ``model`` (a :class:`selecsls.SelecSLS`).

    A different classifier size keeps the loaded backbone and the model's fresh classifier
    (with a warning); a model without classifier ignores the checkpoint's. A stem for
    another number of input channels is adapted (summed for 1 channel, else tiled and
    rescaled) with a warning. Anything else that does not fit raises one
    :class:`CheckpointError` listing the first offending keys and the variant that fits;
    with ``strict=False`` the fitting tensors are loaded and the rest reported like
    ``load_state_dict`` does. ``source`` names the weights in messages.
    """
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
