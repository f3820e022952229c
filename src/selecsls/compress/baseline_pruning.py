"""The field's channel-pruning baseline for networks with additive skips: Torch-Pruning.

A ResNet's residual additions tie the output channels of every block of a stage (and its
projection): a channel can only go from all of them at once, and finding such groups is what
Torch-Pruning's ``DependencyGraph`` does. :func:`prune_to_macs` prunes a ResNet-50 to a MAC budget
with its BN-scale or group-magnitude importance, the baseline SelecSLS's own spec-level pruning
(:mod:`selecsls.compress.pruning`, where every skip is a concatenation) is compared with. The
result is rebuilt as :class:`~selecsls.models.baselines.ResNet50` with the pruned widths (its model
card's ``widths``), so it is described by data and trains, saves and loads like any baseline.

Torch-Pruning is optional (the ``baseline`` extra); without it :func:`prune_to_macs` raises
:class:`~selecsls._optional.MissingDependency` naming the extra.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from selecsls._optional import require
from selecsls.models.baselines import ResNet50, conv_widths, narrowed_widths
from selecsls.models.build import build, describe
from selecsls.models.complexity import count_macs

__all__ = ["IMPORTANCES", "prune_to_macs"]

#: Importance criteria, by the names the study and the CLI use, to Torch-Pruning's classes.
IMPORTANCES = {"bn_scale": "BNScaleImportance", "magnitude": "GroupMagnitudeImportance"}
#: Bisection steps on the per-layer pruning ratio (each halves the interval: 2^-12 of the ratio range).
SEARCH_STEPS = 12


def _pruned_copy(model: nn.Module, ratio: float, importance: str, example: torch.Tensor) -> ResNet50:
    """``model`` with every dependency group pruned by ``ratio`` (the classifier's outputs kept),
    rebuilt as a ResNet50 of the pruned widths holding the surviving weights."""
    tp = require("torch_pruning", "for the Torch-Pruning baseline", extra="baseline")
    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=getattr(tp.importance, IMPORTANCES[importance])(),
        pruning_ratio=ratio,
        ignored_layers=[pruned.fc],
    )
    with torch.no_grad():
        pruner.step()
    card = model.__dict__.get("card") or describe("resnet50", num_classes=model.fc.out_features)
    rebuilt = build(replace(card, widths=narrowed_widths("resnet50", conv_widths(pruned))))
    rebuilt.load_state_dict(pruned.state_dict())
    return rebuilt.train(model.training)


def prune_to_macs(
    model: nn.Module,
    target_macs: int,
    input_size: Sequence[int] = (1, 3, 224, 224),
    importance: str = "bn_scale",
    tolerance: float = 0.01,
) -> ResNet50:
    """A uniformly pruned copy of ``model`` (every dependency group by one ratio, found by bisection)
    whose MACs at ``input_size`` are at most ``target_macs`` and, where the bisection reaches it,
    within ``tolerance`` of it. ``model`` is not changed."""
    if set(conv_widths(model)) != set(ResNet50.dense_widths()) or not isinstance(getattr(model, "fc", None), nn.Linear):
        raise TypeError(
            f"the Torch-Pruning baseline prunes a ResNet-50 (torchvision's module layout), got {type(model).__name__}"
        )
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {sorted(IMPORTANCES)}, got {importance!r}")
    dense = count_macs(model, input_size)
    if not 0 < target_macs < dense:
        raise ValueError(f"target_macs must be between 0 and the dense model's {dense:,}, got {target_macs:,}")
    example = torch.zeros(*input_size)
    low, high, best = 0.0, 1.0, None
    for _ in range(SEARCH_STEPS):
        ratio = (low + high) / 2
        candidate = _pruned_copy(model, ratio, importance, example)
        macs = count_macs(candidate, input_size)
        if macs <= target_macs:
            high, best = ratio, candidate
            if macs >= (1 - tolerance) * target_macs:
                break
        else:
            low = ratio
    if best is None:
        raise ValueError(f"no pruning ratio brings the model to {target_macs:,} MACs; ask for more")
    return best
