"""Model size and cost, counted from the model itself (never typed in)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_flops", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """FLOPs of one inference forward pass, counted by torch's FlopCounterMode on a zero input.

    One multiply-accumulate counts as 2 FLOPs (torch's convention). Only matmul/conv-like
    ops are counted, the usual convention of papers that report GMACs.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(*input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass (half of :func:`count_flops`)."""
    return count_flops(model, input_size) // 2
