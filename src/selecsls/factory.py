"""``create_model`` / ``list_models``: the timm-style entry points."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from .checkpoint import is_fused, load_checkpoint, read_state_dict
from .fusion import fuse
from .model import SelecSLS, SelecSLSFeatures
from .spec import ModelSpec, SpecError, get_spec, list_variants
from .weights import download, get_weights

__all__ = ["create_model", "list_models", "resolve_spec"]


def list_models(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_model` (shell-style ``pattern`` filter)."""
    from fnmatch import fnmatch

    return [name for name in list_variants() if fnmatch(name, pattern)]


def resolve_spec(name_or_spec: Union[str, ModelSpec, dict]) -> ModelSpec:
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
    name_or_spec: Union[str, ModelSpec, dict],
    *,
    num_classes: int = 1000,
    in_chans: Optional[int] = None,
    drop_rate: float = 0.0,
    global_pool: str = "avg",
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    features_only: bool = False,
    out_indices: Optional[Sequence[int]] = None,
    output_stride: Optional[int] = None,
    fused: bool = False,
) -> SelecSLS:
    """Build a SelecSLS network, optionally with weights.

    ``features_only=True`` returns a :class:`SelecSLSFeatures` giving the maps at strides
    2, 4, 8, 16, 32 and 64 (``out_indices`` selects levels); ``output_stride`` 16 or 8
    dilates instead of striding past that resolution.

    ``pretrained=True`` downloads the variant's published ImageNet weights (a tag picks
    another entry: ``'selecsls60.xnect_original'``, see :mod:`selecsls.weights`);
    ``checkpoint_path`` loads a local file of any layout (:func:`selecsls.checkpoint.load_checkpoint`).
    With ``fused=True`` and unfused weights, BatchNorm is folded after loading.
    """
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
