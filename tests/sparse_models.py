"""Tiny SelecSLS models with chosen inactive channels, for the sparsity, pruning and CLI tests."""

from __future__ import annotations

import torch
from torch import nn

from selecsls import ModelSpec, create_model, get_spec
from selecsls.models.card import ModelCard
from selecsls.models.channel_flow import CLASSIFIER, channel_flow, consumers_of
from selecsls.models.network import SelecSLS

IMAGE = (2, 3, 64, 64)


def tiny_spec(variant: str = "selecsls42b"):
    """``variant``'s shape with every width divided by 16 (at least 4): milliseconds per forward."""
    spec = get_spec(variant)
    short = "tiny" + variant.removeprefix("selecsls")
    return spec.with_widths({name: max(4, cout // 16) for name, _, cout, _ in spec.conv_layers()}, name=short)


def hollow_entries(spec: ModelSpec, num_classes: int) -> dict:
    """A hand-made file's entries for ``spec``: its card, and weights of its shapes that are all zero-stride views
    of one stored number, so the file stays small however wide ``spec`` is (shapes found on the meta device)."""
    with torch.device("meta"):
        shapes = SelecSLS(spec, num_classes=num_classes).state_dict()
    state = {key: torch.zeros((), dtype=t.dtype).expand(t.shape) for key, t in shapes.items()}
    return {**ModelCard(spec, num_classes=num_classes).entries(), "state_dict": state}


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Conv layer name ('features.1.conv2') -> its BatchNorm."""
    return {name.removesuffix(".bn"): m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, as after training (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in batchnorms(model).values():
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def deactivate(model: nn.Module, channels: dict[str, list[int]], beta: float = 0.0) -> nn.Module:
    """Set gamma to 0 and beta to ``beta`` on the given channels of the given layers."""
    bns = batchnorms(model)
    with torch.no_grad():
        for name, idx in channels.items():
            bns[name].weight[idx] = 0.0
            bns[name].bias[idx] = beta
    return model


#: The kinds of inactive channel exact pruning removes (the reasons it reports, but "dead").
KINDS = ("gamma", "filter", "constant", "unread")


def make_inactive(model: nn.Module, kind: str, channels: dict[str, list[int]]) -> nn.Module:
    """Make the given channels of an unfused model inactive the way ``kind`` says: ``gamma`` = 0 (output
    zero), ``filter`` decayed to 1e-6 under a live gamma (output zero), ``gamma`` = 0 with beta > 0
    (``constant`` output), or ``unread`` (their columns zero in every consumer)."""
    bns = batchnorms(model)
    modules = dict(model.named_modules())
    readers = consumers_of(channel_flow(model.spec, with_classifier=isinstance(model.fc, nn.Linear)))
    with torch.no_grad():
        for name, idx in channels.items():
            bn, conv = bns[name], modules[name].conv
            if kind == "gamma":
                bn.weight[idx], bn.bias[idx] = 0.0, -0.3
            elif kind == "filter":
                conv.weight[idx] *= 1e-6
                bn.running_mean[idx], bn.bias[idx] = 0.0, -0.3
            elif kind == "constant":
                bn.weight[idx], bn.bias[idx] = 0.0, 0.7
            else:
                for consumer, offset in readers[name]:
                    reader = model.fc if consumer.name == CLASSIFIER else modules[consumer.name].conv
                    reader.weight[:, [offset + i for i in idx]] = 0.0
    return model


def every_kind(model: nn.Module, seed: int = 0) -> nn.Module:
    """About a tenth of every layer's channels inactive in each of the :data:`KINDS` (disjoint, never all)."""
    gen = torch.Generator().manual_seed(seed)
    for name, bn in batchnorms(model).items():
        order = torch.randperm(bn.num_features, generator=gen).tolist()
        share = max(1, bn.num_features // 10) if bn.num_features > len(KINDS) else 0
        for k, kind in enumerate(KINDS):
            make_inactive(model, kind, {name: order[k * share : (k + 1) * share]})
    return model


def random_inactive(model: nn.Module, fraction: float, seed: int = 0) -> dict[str, list[int]]:
    """About ``fraction`` of every layer's channels (never all of them), chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    chosen = {}
    for name, bn in batchnorms(model).items():
        idx = (torch.rand(bn.num_features, generator=gen) < fraction).nonzero().flatten().tolist()
        chosen[name] = idx[: bn.num_features - 1]
    return chosen


def sparse_tiny_model(fraction: float = 0.3, seed: int = 0, **kwargs) -> nn.Module:
    """A trained-looking tiny model with ``fraction`` of its channels at gamma = beta = 0."""
    model = trained_like(create_model(tiny_spec(), **{"num_classes": 10} | kwargs), seed)
    return deactivate(model, random_inactive(model, fraction, seed))


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((reference - output).abs().max() / reference.abs().max())
