"""Fold BatchNorm into the preceding convolutions: the same network built with ``fused=True``."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from selecsls.models.build import build
from selecsls.models.network import ConvNormAct, SelecSLS

__all__ = ["fold_bn", "fuse"]


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to ``bn(conv(x))`` with ``bn`` in eval mode (torch's folding)."""
    return fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


@torch.no_grad()
def fuse(model: SelecSLS) -> SelecSLS:
    """A new model with every BatchNorm folded into its conv (outputs unchanged in eval mode).

    The input model is not modified; an already fused model is returned as a copy.
    """
    if not isinstance(model, SelecSLS):
        raise TypeError(f"fuse expects a SelecSLS model, got {type(model).__name__}")
    if model.fused:
        return copy.deepcopy(model)
    fused = build(replace(model.card, fused=True))
    fused.load_state_dict(fused_state_dict(model))
    return fused.train(model.training)


def fused_state_dict(model: SelecSLS) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` rebuilt with ``fused=True``: BN folded into conv weight and bias."""
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, ConvNormAct):
            if isinstance(module.bn, nn.BatchNorm2d):
                weight, bias = fold_bn(module.conv, module.bn)
            else:
                weight, bias = module.conv.weight, module.conv.bias
            state[f"{name}.conv.weight"] = weight.detach().clone()
            state[f"{name}.conv.bias"] = bias.detach().clone()
    if isinstance(model.fc, nn.Linear):
        state["fc.weight"] = model.fc.weight.detach().clone()
        state["fc.bias"] = model.fc.bias.detach().clone()
    return state
