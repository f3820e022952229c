"""``create_model`` / ``list_models``: the one registry of SelecSLS variants and baselines (timm-style)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fnmatch import fnmatch

from selecsls._io import printable
from selecsls.models.baselines import list_baselines
from selecsls.models.build import build, describe, refuse_baseline_options, resolve_spec
from selecsls.models.files import read_model_file
from selecsls.models.loading import card_for, materialize
from selecsls.models.spec import ModelSpec, list_variants
from selecsls.models.weights import cache_dir, default_weights, download, get_weights

__all__ = ["create_model", "list_models", "resolve_spec"]


def list_models(pattern: str = "*", baselines: bool = False) -> list[str]:
    """SelecSLS variant names (shell-style ``pattern`` filter); ``baselines=True`` adds the
    reference networks (resnet50, vovnet39). :func:`create_model` builds every name listed."""
    names = list_variants() + (list_baselines() if baselines else [])
    return [name for name in names if fnmatch(name, pattern)]


def create_model(
    name_or_spec: str | ModelSpec | dict,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    drop_rate: float | None = None,
    global_pool: str | None = None,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    features_only: bool | None = None,
    out_indices: Sequence[int] | None = None,
    output_stride: int | None = None,
    fused: bool | None = None,
):
    """Build a SelecSLS network (or a baseline), optionally with weights.

    ``features_only=True`` returns a :class:`~selecsls.models.network.SelecSLSFeatures` giving the maps
    at strides 2, 4, 8, 16, 32 and 64 (``out_indices`` selects levels); ``output_stride`` 16 or 8
    dilates instead of striding past that resolution.

    ``pretrained=True`` downloads the variant's published ImageNet weights (a tag picks
    another entry: ``'selecsls60.xnect_original'``, see :mod:`selecsls.models.weights`);
    ``checkpoint_path`` loads a local file of any layout as :func:`selecsls.load` does, with these
    arguments as its overrides: a file with a saved description keeps its preprocessing, class names
    and provenance (and must be of the named architecture), a plain state dict builds the named
    model. Either way the weights go through the one loading pipeline (:mod:`selecsls.models.loading`):
    with ``fused=True`` and unfused weights, BatchNorm is folded after loading.

    An option left at None is not chosen: a checkpoint keeps its own (a 10-class file loads with its
    10 classes), a new model takes the default (1000 classes, ``avg`` pooling, no dropout, unfused).
    """
    if isinstance(name_or_spec, str) and name_or_spec in list_baselines():
        refuse_baseline_options(name_or_spec, dict(pretrained=pretrained, checkpoint_path=checkpoint_path))
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass either pretrained=True or checkpoint_path, not both")
    if pretrained and not isinstance(name_or_spec, str):
        raise ValueError(
            "pretrained=True needs a published variant name such as 'selecsls60'; "
            "load a custom or pruned model with checkpoint_path or selecsls.load"
        )
    weights = get_weights(name_or_spec) if pretrained else None
    chosen = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        global_pool=global_pool,
        features_only=features_only,
        out_indices=out_indices,
        output_stride=output_stride,
        fused=fused,
    )
    options = {key: value for key, value in chosen.items() if value is not None}
    card = describe(name_or_spec, **options)  # the options are checked before any file is read
    if weights is not None:
        return materialize(weights.describe(card), read_model_file(download(weights)))
    if checkpoint_path is not None:
        if not os.path.exists(checkpoint_path):
            raise _missing_checkpoint(checkpoint_path, name_or_spec)
        file = read_model_file(checkpoint_path)
        return materialize(card_for(file, name_or_spec, **options), file)
    return build(card)


def _missing_checkpoint(path: str, name_or_spec: str | ModelSpec | dict) -> FileNotFoundError:
    """A missing ``checkpoint_path``, with where it was looked for and the ways to weights that exist."""
    published = default_weights(name_or_spec) if isinstance(name_or_spec, str) else None
    where = "" if os.path.isabs(path) else f" (looked for in {printable(os.getcwd())})"
    other = (
        f"create_model({name_or_spec!r}, pretrained=True) downloads the published ImageNet weights once into "
        f"{printable(str(cache_dir()))}, then works offline"
        if published is not None
        else "without checkpoint_path the model gets random weights"
    )
    return FileNotFoundError(
        f"checkpoint_path {printable(path)} does not exist{where}: give the path of a model file (.pt, .pth, "
        f".safetensors: ours, the reference's, timm's or a training run's best.pt); or {other}"
    )
