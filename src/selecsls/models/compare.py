"""How far one model's outputs are from another's: the package's one relative-difference metric."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relative_difference"]


def relative_difference(expected: Tensor, actual: Tensor) -> float:
    """max |actual - expected| / max |expected|: a change measured against the outputs' own scale.

    Export checks, pruning's output change and the benchmarks all report this number, so their
    tolerances mean the same thing. An all-zero ``expected`` is scaled by float32's smallest normal.
    """
    scale = max(float(expected.abs().max()), torch.finfo(torch.float32).tiny)
    return float((actual - expected).abs().max()) / scale
