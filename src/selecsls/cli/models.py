"""``selecsls models`` and ``selecsls info``: what the package can build, and what a model file holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="table of variants: params, GMACs at 224x224, published top-1")
    p.add_argument("--img-size", type=int, default=224, help="input size for the GMACs column (default 224)")
    p.set_defaults(func=run_models)
    p = subparsers.add_parser(
        "info", help="print a variant's spec and feature levels, or what a model file holds and whether it is intact"
    )
    p.add_argument("name", help="variant name, e.g. selecsls60, or a model file (.pt, .pth, .safetensors)")
    p.add_argument("--json", action="store_true", help="print the spec (for a file: what it holds) as JSON")
    p.set_defaults(func=run_info)


def run_models(args: argparse.Namespace) -> int:
    from selecsls import count_macs, count_params, create_model, list_models
    from selecsls.models.validation import check_img_size
    from selecsls.models.weights import default_weights

    check_img_size(args.img_size)
    print(f"{'model':<14}{'params':>14}{f'GMACs@{args.img_size}':>12}{'top-1':>8}{'top-5':>8}  pretrained weights")
    for name in list_models():
        model = create_model(name)
        macs = count_macs(model, (1, 3, args.img_size, args.img_size))
        weights = default_weights(name)
        accuracy = f"{weights.top1:>8.2f}{weights.top5:>8.2f}  {weights.name}" if weights else f"{'-':>8}{'-':>8}  -"
        print(f"{name:<14}{count_params(model):>14,}{macs / 1e9:>12.2f}{accuracy}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from selecsls import create_model, get_spec
    from selecsls.models.files import MODEL_FILE_SUFFIXES

    if args.name.endswith(MODEL_FILE_SUFFIXES) or Path(args.name).is_file():
        return _file_info(args.name, args.json)
    spec = get_spec(args.name)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
    else:
        _print_spec(spec, create_model(spec))
    return 0


def _file_info(path: str, as_json: bool) -> int:
    """What the model file at ``path`` holds, whether its content is verified against its hash and its spec.

    The file passes the checks ``eval`` makes (the loading pipeline, the model built and its weights loaded), so
    info never describes a model that does not load."""
    from selecsls._io import printable
    from selecsls.models.complexity import count_params
    from selecsls.models.files import read_model_file
    from selecsls.models.layouts import fitting_variants
    from selecsls.models.loading import card_for, materialize
    from selecsls.models.spec import ModelSpec

    file = read_model_file(path)  # a damaged file fails here: "file is damaged: ..."
    card = file.card
    fits = fitting_variants(file.state) if card is None else []
    model = materialize(card_for(file), file) if card is not None or fits else None
    spec = card.architecture if card is not None and isinstance(card.architecture, ModelSpec) else None
    if card is None:
        what = f"a state dict without a model card; its shapes fit {', '.join(fits) or 'no published variant'}"
    else:
        size = "x".join(map(str, card.preprocessing.input_size))
        what = f"{card.name}, {card.num_classes} classes, input {size}{', BN-fused' if file.fused else ''}"
    params = None if model is None else count_params(model)
    if params is not None:
        what += f", {params:,} parameters"
    if file.content_hash is None:
        content = (
            "unverified (it carries no content hash: written by another tool or by selecsls 0.1, so damage "
            "to it cannot be detected)"
        )
    else:
        content = f"verified (sha256 {file.content_hash})"
    if as_json:
        facts = dict(
            file=path, model=what, params=params, verified=file.content_hash is not None, sha256=file.content_hash
        )
        print(json.dumps({**facts, "spec": spec.to_dict() if spec else None}, indent=2))
        return 0
    print(f"{printable(path)}: {what}")
    print(f"content: {content}")
    if spec is not None:
        _print_spec(spec, model)
    return 0


def _print_spec(spec, model) -> None:
    """The convs, feature levels and eval-mode conv algorithm of ``model``, the network ``spec`` describes."""
    from selecsls.models.conv import SmallMapConv2d

    print(
        f"{spec.name}: stem {spec.stem_chs}, {len(spec.blocks)} blocks in {len(spec.stages())} stages, "
        f"{len(spec.head)} head convs, {spec.num_features} features"
    )
    print(f"{'layer':<18}{'in':>6}{'out':>6}{'k':>3}")
    for layer, cin, cout, k in spec.conv_layers():
        print(f"{layer:<18}{cin:>6}{cout:>6}{k:>3}")
    print("feature levels (features_only=True):")
    for level, info in enumerate(model.feature_info):
        print(f"  {level}: {info['module']:<12} {info['num_chs']:>5} channels, stride {info['reduction']}")
    large = [name for name, m in model.named_modules() if isinstance(m, SmallMapConv2d) and m.runs_as_product_in_eval()]
    print(
        f"eval mode on the CPU: {', '.join(large) or 'no conv'} run as an exact im2col matmul on maps of at most "
        f"{SmallMapConv2d.gemm_max_eval_positions} output positions (batch x pixels), the others as oneDNN's conv; "
        "nothing is kept between calls (selecsls.freeze packs the weights once)"
    )
