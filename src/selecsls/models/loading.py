"""Any model file -> a ready model, through one pipeline that every entry point uses.

1. **read** the file without running pickled code and **identify** what it holds
   (:func:`~selecsls.models.files.read_model_file`): the weights in our key layout
   (:func:`~selecsls.models.layouts.checkpoint_filter_fn`), finite, and the file's card, checked against
   the weights' shapes before anything is allocated; :func:`card_for` then decides the model: the
   file's card with the caller's overrides or, for a plain state dict, the variant its shapes fit;
3. **build** the network the card describes (:func:`~selecsls.models.build.build`);
4. **load the weights** once, adapting the stem and the classifier
   (:func:`~selecsls.models.checkpoint.load_state`);
5. **fold BatchNorm** if the card asks for a fused model and the weights are not (:func:`materialize`).

:func:`load` runs them all; ``create_model(checkpoint_path=)`` (its arguments as :func:`card_for`'s overrides),
``create_model(pretrained=True)`` (the published entry's card), training's ``--init`` (its card edited) and
``--resume`` (a file already read) run the same steps.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from selecsls._io import PathLike, one_line
from selecsls.models.baselines import list_baselines
from selecsls.models.build import build, describe, resolve_spec
from selecsls.models.card import ModelCard
from selecsls.models.checkpoint import load_state
from selecsls.models.files import ModelFile, read_model_file
from selecsls.models.fusion import fuse
from selecsls.models.layouts import fitting_variants
from selecsls.models.network import SelecSLS
from selecsls.models.spec import VARIANTS, ModelSpec
from selecsls.models.validation import CheckpointError

__all__ = ["OVERRIDES", "card_for", "load", "materialize"]

#: Keyword arguments of :func:`load` that change how a saved model is rebuilt.
OVERRIDES = ("num_classes", "drop_rate", "global_pool", "output_stride", "fused", "features_only", "out_indices")


def load(path: PathLike, name: str | ModelSpec | None = None, **overrides: Any) -> nn.Module:
    """Any model file -> a ready model: the one loader behind eval, prune, export and predict.

    A file written by :func:`~selecsls.models.files.save` or by training is rebuilt from its card
    (``name`` is not needed): ``num_classes`` re-initialises the classifier (with a warning),
    ``features_only=True`` drops it, ``fused=True`` folds BatchNorm after loading (unfusing is
    impossible). A plain state dict of any layout builds ``name`` or, when ``name`` is None, the
    published variant its tensor shapes fit, with the file's classes, input channels and fusion unless
    ``overrides`` (any :func:`~selecsls.models.factory.create_model` argument) say otherwise. Like
    ``create_model``, the model comes back in training mode. The file is read once.
    """
    file = read_model_file(path)
    return materialize(card_for(file, name, **overrides), file)


def card_for(file: ModelFile, name: str | ModelSpec | dict | None = None, **overrides: Any) -> ModelCard:
    """The card of the model to build from ``file``: its own with ``overrides``, or the one its shapes imply.

    ``name`` builds a plain state dict; a file with a card builds what its card says, and a ``name`` naming another
    architecture is refused (the file's weights would not be the named model's)."""
    if file.card is None:
        return describe(name or _fitting_variant(file), **_implied_args(file) | overrides)
    card = file.card
    if name is not None and not _names(name, card):
        raise CheckpointError(
            f"{file.source} holds a {card.name} model (its saved description), not {_shown(name)}: "
            "load it without a model name (selecsls.load(path))"
        )
    if overrides.get("in_chans", card.in_chans) in (None, card.in_chans):  # a saved model keeps its channels
        overrides.pop("in_chans", None)
    if not overrides:
        return card
    if isinstance(card.architecture, str):
        if any(key != "num_classes" or value != card.num_classes for key, value in overrides.items()):
            raise ValueError(
                f"{file.source} holds a {card.name} baseline, which loads as saved; drop {', '.join(overrides)}"
            )
        return card
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(
            f"cannot override {', '.join(unknown)} when loading a saved model; allowed: {', '.join(OVERRIDES)}"
        )
    if card.fused and not overrides.get("fused", True):
        raise ValueError(
            "the saved model is BN-fused and cannot be unfused; load it with fused=True (selecsls.load does)"
        )
    features_only = overrides.pop("features_only", card.features_only)
    args = card.build_args | overrides
    if not features_only and "out_indices" not in overrides:
        args.pop("out_indices", None)
    rebuilt = describe(card.architecture, features_only=features_only, **args)
    labels = card.label_names if rebuilt.num_classes == card.num_classes else None  # else a new classifier
    return replace(rebuilt, preprocessing=card.preprocessing, label_names=labels, provenance=card.provenance)


def _names(name: str | ModelSpec | dict, card: ModelCard) -> bool:
    """Whether ``name`` (a variant, a tagged variant, a spec or a baseline) is the architecture ``card`` describes."""
    if isinstance(card.architecture, str) or name in list_baselines():
        return name == card.architecture
    spec = resolve_spec(name.partition(".")[0] if isinstance(name, str) else name)
    return spec.with_in_chans(card.in_chans) == card.architecture


def _shown(name: str | ModelSpec | dict) -> str:
    return name if isinstance(name, str) else f"the given spec {resolve_spec(name).name!r}"


def _fitting_variant(file: ModelFile) -> str:
    fits = fitting_variants(file.state)
    if not fits:
        raise CheckpointError(
            f"{file.source}: its tensor shapes fit no published variant ({', '.join(VARIANTS)}); pass "
            "the model name (--model NAME) if it is one of them with other keys, or load a pruned model from "
            "the file selecsls.save / selecsls prune wrote"
        )
    return fits[0]


def _implied_args(file: ModelFile) -> dict[str, Any]:
    """The build arguments a plain state dict implies: fused, input channels, classes."""
    state, args = file.state, {"fused": file.fused}
    stem = state.get("stem.conv.weight")
    if stem is not None and stem.dim() == 4:
        args["in_chans"] = stem.shape[1]
    if "fc.weight" in state:
        args["num_classes"] = state["fc.weight"].shape[0]
    return args


def materialize(card: ModelCard, file: ModelFile) -> nn.Module:
    """The model ``card`` describes with the weights of ``file``, loaded once; BatchNorm folded after
    loading when the card is fused and the weights are not."""
    fold = card.fused and not file.fused
    model = build(replace(card, fused=False) if fold else card)
    if isinstance(model, SelecSLS):
        load_state(model, file.state, source=file.source)
    else:
        try:
            model.load_state_dict(file.state)
        except RuntimeError as exc:
            raise CheckpointError(f"{file.source} does not fit the {card.name} baseline ({one_line(exc)})") from None
    return fuse(model) if fold else model
