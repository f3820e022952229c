"""``create_model`` / ``list_models``: the one registry of SelecSLS variants and baselines (timm-style)."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any

from torch import nn

from selecsls.models.baselines import create_baseline, list_baselines
from selecsls.models.checkpoint import is_fused, load_checkpoint, read_state_dict
from selecsls.models.fusion import fuse
from selecsls.models.network import SelecSLS, SelecSLSFeatures, default_cfg
from selecsls.models.spec import ModelSpec, SpecError, get_spec, list_variants
from selecsls.models.weights import download, get_weights

__all__ = ["create_model", "list_models", "resolve_spec"]


def list_models(pattern: str = "*", baselines: bool = False) -> list[str]:
    """SelecSLS variant names (shell-style ``pattern`` filter); ``baselines=True`` adds the
    reference networks (resnet50, vovnet39). :func:`create_model` builds every name listed."""
    names = list_variants() + (list_baselines() if baselines else [])
    return [name for name in names if fnmatch(name, pattern)]


def resolve_spec(name_or_spec: str | ModelSpec | dict) -> ModelSpec:
    """A variant name, a :class:`ModelSpec` or its dict form -> validated spec."""
    if isinstance(name_or_spec, ModelSpec):
        name_or_spec.validate()
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return ModelSpec.from_dict(name_or_spec)
    if isinstance(name_or_spec, str):
        return get_spec(name_or_spec)
    raise SpecError(f"expected a variant name or ModelSpec, got {type(name_or_spec).__name__}")


def create_model(
    name_or_spec: str | ModelSpec | dict,
    *,
    num_classes: int = 1000,
    in_chans: int | None = None,
    drop_rate: float = 0.0,
    global_pool: str = "avg",
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    output_stride: int | None = None,
    fused: bool = False,
) -> SelecSLS:
    """Build a SelecSLS network, optionally with weights.

    ``features_only=True`` returns a :class:`SelecSLSFeatures` giving the maps at strides
    2, 4, 8, 16, 32 and 64 (``out_indices`` selects levels); ``output_stride`` 16 or 8
    dilates instead of striding past that resolution.

    ``pretrained=True`` downloads the variant's published ImageNet weights (a tag picks
    another entry: ``'selecsls60.xnect_original'``, see :mod:`selecsls.models.weights`);
    ``checkpoint_path`` loads a local file of any layout (:func:`selecsls.models.checkpoint.load_checkpoint`).
    With ``fused=True`` and unfused weights, BatchNorm is folded after loading.
    """
    if isinstance(name_or_spec, str) and name_or_spec in list_baselines():
        return _create_baseline(name_or_spec, num_classes, locals())
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True or checkpoint_path, not both")
    if pretrained and not isinstance(name_or_spec, str):
        raise ValueError(
            "pretrained=True needs a published variant name such as 'selecsls60'; "
            "load a custom or pruned model with checkpoint_path or selecsls.load"
        )
    weights = get_weights(name_or_spec) if pretrained else None
    if isinstance(name_or_spec, str):
        name_or_spec = name_or_spec.partition(".")[0]  # 'selecsls60.in1k': the tag only selects weights
    spec = resolve_spec(name_or_spec)
    source = download(weights) if weights is not None else checkpoint_path
    state = read_state_dict(source) if source is not None else None
    fold_bn_after_loading = fused and state is not None and not is_fused(state)
    kwargs: dict[str, Any] = dict(
        in_chans=in_chans, drop_rate=drop_rate, output_stride=output_stride, fused=fused and not fold_bn_after_loading
    )
    if features_only:
        model: SelecSLS = SelecSLSFeatures(spec, out_indices=out_indices, **kwargs)
    else:
        if out_indices is not None:
            raise ValueError("out_indices only applies with features_only=True")
        model = SelecSLS(spec, num_classes=num_classes, global_pool=global_pool, **kwargs)
    if state is not None:
        load_checkpoint(model, state, source=str(source))
    if weights is not None:
        cfg = weights.pretrained_cfg()
        model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "input_size": (model.in_chans, *cfg["input_size"][1:])}
    return fuse(model) if fold_bn_after_loading else model


def _create_baseline(name: str, num_classes: int, arguments: dict[str, Any]) -> nn.Module:
    """A baseline by name; SelecSLS-only options are refused rather than silently ignored."""
    accepted = dict(
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
    given = sorted(key for key, values in accepted.items() if arguments[key] not in values)
    if given:
        raise ValueError(
            f"baseline {name} is built with random weights, 3 input channels and a classifier only; "
            f"drop {', '.join(given)} (they apply to SelecSLS variants)"
        )
    model = create_baseline(name, num_classes=num_classes)
    # The attributes SelecSLS has (timm's convention), so train/eval/predict treat every model alike.
    model.num_classes = num_classes
    model.pretrained_cfg = {**default_cfg(name, num_classes, 3), "first_conv": None, "classifier": None}
    return model
