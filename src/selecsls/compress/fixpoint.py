"""Which channels exact pruning removes, and why: one test on the BN-folded weights, repeated to its fixpoint.

A conv channel computes ``ReLU(f . x + b)`` with its fused filter ``f = gamma / sqrt(var + eps) * W``
and fused bias ``b``. Every test here reads only ``f`` and ``b`` (and the readers' columns), so a
model and its :func:`~selecsls.models.fusion.fuse` d copy lose the same channels:

* ``||f||_2 < threshold``: the output is the constant ``ReLU(b)``. With ``b <= 0`` it is zero and the
  channel goes (reason ``gamma`` when its |gamma| is below the threshold too, else ``filter``: a
  filter decayed to ~0 under a live gamma, or a fused input whose gamma is gone). With ``b > 0`` the
  constant moves into the biases of its readers when all are 1x1 convs or the classifier
  (``constant``); a 3x3 reader zero-pads, so there the constant is not constant at the border and
  the channel stays.
* a channel the calibration images never fired (``dead``, only when such data are given) is zero there.
* its columns in every reader have L2 norm below the threshold: nobody reads it (``unread``).

Removing channels changes the network (a reader whose inputs are all gone becomes constant; a
layer whose readers lost their rows is read by nobody), so the test runs again on the result until
nothing changes. The result is a fixpoint: pruning it again removes nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selecsls.models.channel_flow import CLASSIFIER, Consumer, channel_flow, consumers_of
from selecsls.models.fusion import fused_state_dict
from selecsls.models.network import SelecSLS, SelecSLSFeatures

__all__ = ["REASONS", "Fixpoint", "exact_fixpoint", "output_layers", "slice_channels"]

#: Why a channel was removed, in the order the reasons are tested (and the table's columns).
REASONS = ("gamma", "filter", "dead", "constant", "unread")


@dataclass(frozen=True)
class Fixpoint:
    """The outcome of :func:`exact_fixpoint`.

    ``keep``: per conv layer, the sorted indices (in the input model) of the channels that stay.
    ``state``: the fused state dict sliced to ``keep``, removed constants folded into reader biases
    (float32, on the CPU), read along ``flow``. ``removed``: per layer, how many channels each reason
    removed. ``rounds``: how many passes removed something.
    """

    keep: dict[str, Tensor]
    state: dict[str, Tensor]
    flow: tuple[Consumer, ...]
    removed: dict[str, Counter]
    rounds: int

    @property
    def widths(self) -> dict[str, int]:
        """Layer -> channels it keeps."""
        return {name: len(kept) for name, kept in self.keep.items()}

    def narrowed(self, keep: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with only the channels of ``keep`` (a subset of :attr:`keep`, indices in the input
        model): the others are dropped as they are (changing the outputs), e.g. to meet a budget."""
        positions = {name: torch.isin(self.keep[name], keep[name]).nonzero().flatten() for name in self.keep}
        nothing = {name: torch.zeros(len(kept)) for name, kept in self.keep.items()}
        return slice_channels(self.state, self.flow, positions, nothing)


def output_layers(model: SelecSLS) -> set[str]:
    """Layers whose output channels the model returns (never pruned)."""
    if isinstance(model, SelecSLSFeatures):
        return {
            info["module"] + (".conv6" if info["module"].startswith("features.") else "") for info in model.feature_info
        }
    if not isinstance(model.fc, nn.Linear):
        return {list(model.spec.conv_layers())[-1][0]}
    return set()


@torch.no_grad()
def exact_fixpoint(model: SelecSLS, threshold: float, dead: dict[str, Tensor] | None = None) -> Fixpoint:
    """The channels of ``model`` that can go without changing its outputs, found by repeating the
    tests of the module docstring until nothing changes. ``dead`` (layer -> bool per channel) marks
    channels seen to be zero after ReLU on calibration images. Every layer keeps at least one channel;
    the layers of :func:`output_layers` keep all."""
    spec, classifier = model.spec, isinstance(model.fc, nn.Linear)
    state = {key: value.detach().float().cpu() for key, value in fused_state_dict(model).items()}
    keep = {name: torch.arange(cout) for name, _, cout, _ in spec.conv_layers()}
    gamma = {
        name: module.bn.weight.detach().abs().float().cpu()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "bn", None), nn.BatchNorm2d)
    }
    protected = output_layers(model)
    removed = {name: Counter() for name in keep}
    rounds = 0
    while True:
        widths = {name: len(kept) for name, kept in keep.items()}
        flow = channel_flow(spec.with_widths(widths), with_classifier=classifier)
        drop, constants = {}, {name: torch.zeros(width) for name, width in widths.items()}
        for name, readers in consumers_of(flow).items():
            if name in protected:
                continue
            reasons = _reasons(name, readers, state, threshold, gamma.get(name), dead, keep[name])
            if bool((reasons >= 0).all()):  # every layer keeps its strongest channel
                reasons[_norms(state, name).argmax()] = -1
            gone = reasons >= 0
            if gone.any():
                drop[name] = gone
                for code, count in zip(*torch.unique(reasons[gone], return_counts=True)):
                    removed[name][REASONS[int(code)]] += int(count)
            folded = reasons == REASONS.index("constant")
            constants[name] = torch.where(folded, torch.relu(state[f"{name}.conv.bias"]), 0.0)
        if not drop:
            return Fixpoint(keep, state, flow, removed, rounds)
        rounds += 1
        kept = {
            name: (~drop[name]).nonzero().flatten() if name in drop else torch.arange(widths[name]) for name in keep
        }
        state = slice_channels(state, flow, kept, constants)
        keep = {name: keep[name][kept[name]] for name in keep}


def _norms(state: dict[str, Tensor], name: str) -> Tensor:
    """The L2 norm of each channel's fused filter."""
    return state[f"{name}.conv.weight"].flatten(1).norm(dim=1)


def _prefix(name: str) -> str:
    return "fc" if name == CLASSIFIER else f"{name}.conv"


def _reasons(
    name: str,
    readers: list[tuple[Consumer, int]],
    state: dict[str, Tensor],
    threshold: float,
    gamma: Tensor | None,
    dead: dict[str, Tensor] | None,
    keep: Tensor,
) -> Tensor:
    """Per channel of ``name``, the index in :data:`REASONS` of why it can go, or -1 if it stays."""
    small = _norms(state, name) < threshold
    zero = torch.relu(state[f"{name}.conv.bias"]) == 0
    foldable = all(consumer.kernel_size == 1 for consumer, _ in readers)
    columns = torch.zeros(len(keep))
    for consumer, offset in readers:
        read = state[f"{_prefix(consumer.name)}.weight"][:, offset : offset + len(keep)]
        columns += read.transpose(0, 1).flatten(1).square().sum(1)
    never_fired = dead[name][keep] if dead is not None and name in dead else torch.zeros_like(small)
    low_gamma = gamma[keep] < threshold if gamma is not None else torch.zeros_like(small)
    tests = {
        "gamma": small & zero & low_gamma,
        "filter": small & zero,
        "dead": never_fired,
        "constant": small & foldable,
        "unread": columns.sqrt() < threshold,
    }
    reasons = torch.full(small.shape, -1)
    for code in reversed(range(len(REASONS))):  # the first reason that applies wins
        reasons[tests[REASONS[code]]] = code
    return reasons


def slice_channels(
    state: dict[str, Tensor], flow: tuple[Consumer, ...], keep: dict[str, Tensor], constants: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``state`` without the channels ``keep`` (layer -> positions to keep) leaves out: each producer's
    rows and, in every reader, its columns. A removed channel's ``constants`` entry (its output, where
    that does not depend on the input; 0 for a channel simply dropped) times its weights, summed over
    the kernel, first moves into the reader's bias. ``flow`` gives the offsets of the current widths."""
    sliced = {}
    for consumer in flow:
        prefix = _prefix(consumer.name)
        weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"].clone()
        if consumer.inputs:
            columns = []
            for segment in consumer.inputs:
                kept = keep[segment.producer]
                gone = torch.ones(len(constants[segment.producer]), dtype=torch.bool)
                gone[kept] = False
                gone = gone.nonzero().flatten()
                bias += torch.einsum("oi...,i->o", weight[:, segment.offset + gone], constants[segment.producer][gone])
                columns.append(segment.offset + kept)
            weight = weight[:, torch.cat(columns)]
        if consumer.name in keep:
            weight, bias = weight[keep[consumer.name]], bias[keep[consumer.name]]
        sliced[f"{prefix}.weight"], sliced[f"{prefix}.bias"] = weight.contiguous(), bias
    return sliced
