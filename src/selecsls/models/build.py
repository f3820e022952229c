"""Cards to networks: the one place a model is made, from its description, and given it.

:func:`describe` turns :func:`~selecsls.models.factory.create_model`'s arguments into a
:class:`~selecsls.models.card.ModelCard`; :func:`build` makes the network a card describes. Loading
(:mod:`~selecsls.models.loading`), fusing and pruning build through here too, so every model of the
package carries its card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from selecsls.models.baselines import create_baseline, list_baselines
from selecsls.models.card import ModelCard
from selecsls.models.network import SelecSLS, SelecSLSFeatures
from selecsls.models.spec import ModelSpec, SpecError, get_spec

__all__ = ["build", "describe", "refuse_baseline_options", "resolve_spec"]


def resolve_spec(name_or_spec: str | ModelSpec | dict) -> ModelSpec:
    """A variant name, a :class:`ModelSpec` or its dict form -> validated spec."""
    if isinstance(name_or_spec, ModelSpec):  # validated when it was made (specs are frozen)
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return ModelSpec.from_dict(name_or_spec)
    if isinstance(name_or_spec, str):
        return get_spec(name_or_spec)
    raise SpecError(f"expected a variant name or ModelSpec, got {type(name_or_spec).__name__}")


def refuse_baseline_options(name: str, given: Mapping[str, Any]) -> None:
    """A baseline takes ``num_classes`` only: other options (``given``: name -> value) are refused, not ignored."""
    defaults = dict(
        in_chans=(None, 3),
        drop_rate=(0.0,),
        global_pool=("avg",),
        pretrained=(False,),
        checkpoint_path=(None,),
        features_only=(False,),
        out_indices=(None,),
        output_stride=(None,),
        fused=(False,),
    )
    changed = sorted(key for key, value in given.items() if value not in defaults[key])
    if changed:
        raise ValueError(
            f"baseline {name} is built with random weights, 3 input channels and a classifier only; "
            f"drop {', '.join(changed)} (they apply to SelecSLS variants)"
        )


def describe(
    name_or_spec: str | ModelSpec | dict,
    *,
    num_classes: int = 1000,
    in_chans: int | None = None,
    drop_rate: float = 0.0,
    global_pool: str = "avg",
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    output_stride: int | None = None,
    fused: bool = False,
) -> ModelCard:
    """The card of the network these :func:`~selecsls.models.factory.create_model` arguments build."""
    if isinstance(name_or_spec, str) and name_or_spec in list_baselines():
        refuse_baseline_options(
            name_or_spec,
            dict(
                in_chans=in_chans,
                drop_rate=drop_rate,
                global_pool=global_pool,
                features_only=features_only,
                out_indices=out_indices,
                output_stride=output_stride,
                fused=fused,
            ),
        )
        return ModelCard(name_or_spec, num_classes=num_classes)
    if isinstance(name_or_spec, str):
        name_or_spec = name_or_spec.partition(".")[0]  # 'selecsls60.in1k': the tag only selects weights
    spec = resolve_spec(name_or_spec)
    return ModelCard(
        spec if in_chans is None else spec.with_in_chans(in_chans),
        num_classes=0 if features_only else num_classes,
        drop_rate=drop_rate,
        global_pool=global_pool,
        output_stride=output_stride,
        fused=fused,
        features_only=features_only,
        out_indices=None if out_indices is None else tuple(out_indices),
    )


def build(card: ModelCard) -> nn.Module:
    """The network ``card`` describes, randomly initialised (training mode), carrying ``card``."""
    if isinstance(card.architecture, ModelSpec):
        network = SelecSLSFeatures if card.features_only else SelecSLS
        model = network(card.architecture, **card.build_args)
    else:
        model = create_baseline(card.name, **card.build_args)
        # The attributes SelecSLS has (timm's convention), so train/eval/predict treat every model alike.
        model.num_classes = card.num_classes
        model.pretrained_cfg = card.pretrained_cfg()
    model.card = card
    return model
