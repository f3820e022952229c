"""What a model's outputs say: the one check that they are finite, and the one relative-difference metric."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NonFiniteOutputs", "check_finite_outputs", "relative_difference"]


class NonFiniteOutputs(ValueError):
    """A forward pass gave NaN or infinity: any score, prediction or comparison made from it would be meaningless."""


def check_finite_outputs(outputs: Tensor, inputs: str) -> Tensor:
    """``outputs`` of a forward pass on ``inputs`` (named in the message), refused unless all are finite.

    Every command that reports on a forward (eval, predict, export's and pruning's checks) passes its
    outputs here, so a model whose finite weights overflow float32 (values near 3e38) is named as the
    cause instead of being scored as "loss nan" or blamed on an exporter.
    """
    if not bool(outputs.isfinite().all()):
        raise NonFiniteOutputs(
            f"the model produces NaN or infinite outputs on {inputs}: its weights overflow float32 arithmetic "
            "(a damaged or hand-edited file, or a run that diverged), so nothing can be scored on them; "
            "use an earlier checkpoint, or re-download or retrain the model"
        )
    return outputs


def relative_difference(expected: Tensor, actual: Tensor) -> float:
    """max |actual - expected| / max |expected|: a change measured against the outputs' own scale.

    Export checks, pruning's output change and the benchmarks all report this number, so their
    tolerances mean the same thing. An all-zero ``expected`` is scaled by float32's smallest normal.
    """
    scale = max(float(expected.abs().max()), torch.finfo(torch.float32).tiny)
    return float((actual - expected).abs().max()) / scale
