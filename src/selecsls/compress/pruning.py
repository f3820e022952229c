"""Remove channels from a trained SelecSLS: a new, smaller, BN-fused model with the same spec shape.

Pruning decides which output channels every conv keeps, then slices the fused state
dict along the channel flow of :mod:`selecsls.models.channel_flow` (a producer's rows, and its
columns in every consumer at the producer's offset) and builds the same
:class:`~selecsls.models.network.SelecSLS` class from ``spec.with_widths(...)`` with ``fused=True``.

Free pruning (:func:`prune`) removes what :func:`~selecsls.compress.fixpoint.exact_fixpoint`
finds, with its exactness rules:

* A channel whose fused filter is negligible and whose output is zero is removed everywhere (exact).
* One with a non-zero constant output ReLU(bias) is removed only when every consumer is a 1x1
  conv or the classifier: its constant is then folded into their biases (exact). A 3x3 consumer
  zero-pads, so at the border the constant is not constant there; such channels are kept.
* A channel no consumer reads (negligible columns in all of them) is removed.
* These tests repeat until nothing changes, so pruning the result again removes nothing.
* Every layer keeps at least its strongest channel; the classifier's outputs and
  any layer whose output the model returns (feature maps of ``features_only`` models,
  the last layer of a ``num_classes=0`` model) keep every channel.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from selecsls.compress.fixpoint import output_layers
from selecsls.compress.sparsity import SparsityReport, analyze_sparsity, calibration_batches
from selecsls.models.build import build
from selecsls.models.channel_flow import CLASSIFIER, Consumer, channel_flow, consumers_of
from selecsls.models.compare import check_finite_outputs, relative_difference
from selecsls.models.network import SelecSLS
from selecsls.models.validation import check_threshold

__all__ = ["OUTPUT_TOLERANCE", "OutputChangeError", "output_change", "prune", "prune_to_budget"]

PRUNED_SUFFIX = "_pruned"
#: Largest relative output change :func:`prune` accepts unless told otherwise: an exact pruning
#: changes outputs by float rounding only (about 1e-6), a threshold that cuts live channels by far more.
OUTPUT_TOLERANCE = 1e-4
#: Calibration batches the output change is measured on (the first ones of the loader).
MEASURED_BATCHES = 4


class OutputChangeError(ValueError):
    """Pruning would change the model's outputs beyond the accepted tolerance."""


def prune(
    model: SelecSLS,
    threshold: float = 1e-3,
    loader: Iterable | None = None,
    *,
    max_output_change: float | None = OUTPUT_TOLERANCE,
    report: SparsityReport | None = None,
) -> SelecSLS:
    """A new fused model without the channels that do not change the output.

    A channel is inactive when the L2 norm of its fused filter (gamma / sqrt(var + eps) times
    the conv filter; the same with or without BatchNorm) is below ``threshold``, or, given a
    calibration ``loader``, when its post-ReLU output is zero on every calibration image (exact
    on that data only); a channel is unread when its columns in every consumer are below
    ``threshold``. The tests repeat until nothing changes: ``prune(prune(m))`` removes nothing.
    The input model is not modified. See the module docstring for the exactness rules.

    The result is checked, not assumed: its outputs are compared with the input model's
    (:func:`output_change`, on the calibration images, else on a seeded random batch) and the
    measured relative change is recorded as ``pruned.output_change``. A change above
    ``max_output_change`` (a threshold that cuts live channels) raises
    :class:`OutputChangeError`; pass ``max_output_change=None`` to accept any change. ``report``: the
    model's :func:`analyze_sparsity` at this threshold and loader, where the caller already has it.
    """
    check_threshold("threshold", threshold)
    report = _report(model, threshold, loader, report)
    pruned = _build_pruned(model, report.fixpoint.keep, report.fixpoint.state)
    pruned.output_change = output_change(model, pruned, loader)
    if max_output_change is not None and pruned.output_change > max_output_change:
        where = "the calibration images" if loader is not None else "a seeded random batch"
        raise OutputChangeError(
            f"pruning at threshold {threshold:g} changes the outputs by {pruned.output_change:.3g} relative on "
            f"{where} (tolerance {max_output_change:g}): it removes channels that are still active. Lower the "
            "threshold, or accept the change explicitly (selecsls prune --allow-output-change; "
            "prune(..., max_output_change=None)) and fine-tune the result"
        )
    return pruned


@torch.no_grad()
def output_change(reference: SelecSLS, candidate: SelecSLS, loader: Iterable | None = None) -> float:
    """max |candidate - reference| / max |reference| over the outputs (every feature map of a
    ``features_only`` model), on the first calibration batches of ``loader`` or, without one, on
    a seeded random batch of two images at the model's input size (also when ``loader`` is a
    one-shot iterator that pruning already used up). Both run in eval mode."""
    batches = list(itertools.islice(calibration_batches(loader), MEASURED_BATCHES)) if loader is not None else []
    if not batches:
        size = (2, *reference.card.preprocessing.input_size)
        batches = [torch.randn(size, generator=torch.Generator().manual_seed(0))]
    modes = reference.training, candidate.training
    reference.eval()
    candidate.eval()
    try:
        device = next(reference.parameters()).device
        worst = 0.0
        for images in batches:
            images = images.to(device)
            expected, got = reference(images), candidate(images)
            pairs = zip(expected, got) if isinstance(expected, list) else [(expected, got)]
            for before, after in pairs:
                worst = max(worst, relative_difference(check_finite_outputs(before, "the check images"), after))
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    return worst


def prune_to_budget(
    model: SelecSLS,
    macs: float | None = None,
    params: float | None = None,
    loader: Iterable | None = None,
    threshold: float = 1e-3,
    input_size: Sequence[int] | None = None,
    report: SparsityReport | None = None,
) -> SelecSLS:
    """Step 1 of 2: prune to ``macs`` (or ``params``) times the fused input model's cost.

    First the free pruning of :func:`prune`, then the least important channels across the
    whole network (see :attr:`selecsls.compress.sparsity.LayerSparsity.importance`: |gamma| times the
    BN-normalised filter norm, or with a calibration ``loader`` the mean activation, relative
    to the layer's mean) until the target is met. A channel is one unit everywhere it flows, so concatenation
    groups stay consistent. This changes the outputs: step 2 is fine-tuning the result,
    e.g. ``selecsls train --init pruned.pt ...``. MACs are counted at ``input_size``
    (default: the model card's input size, batch 1). The measured output change
    is recorded as ``pruned.output_change`` (see :func:`output_change`). ``report`` as for :func:`prune`.
    """
    if (macs is None) == (params is None):
        raise ValueError("give exactly one budget: macs=FRACTION or params=FRACTION (e.g. macs=0.7)")
    fraction, metric = (macs, "macs") if macs is not None else (params, "params")
    if not 0 < fraction <= 1:
        raise ValueError(f"{metric} must be a fraction in (0, 1] of the input model's cost, got {fraction}")
    check_threshold("threshold", threshold)
    report = _report(model, threshold, loader, report)
    flow = channel_flow(model.spec, with_classifier=isinstance(model.fc, nn.Linear))
    keep = _remove_to_budget(report, output_layers(model), _CostModel(model, flow, metric, input_size), fraction)
    pruned = _build_pruned(model, keep, report.fixpoint.narrowed(keep))
    pruned.output_change = output_change(model, pruned, loader)
    return pruned


def _report(model: SelecSLS, threshold: float, loader: Iterable | None, given: SparsityReport | None) -> SparsityReport:
    """The sparsity analysis pruning acts on: ``given`` (made by the caller at this threshold), else made here."""
    if not isinstance(model, SelecSLS):
        raise TypeError(f"pruning expects a SelecSLS model, got {type(model).__name__}")
    if given is None:
        return analyze_sparsity(model, threshold, loader)
    if given.threshold != threshold or given.calibrated != (loader is not None):
        raise ValueError("report: pass the analysis made at the same threshold and calibration loader as pruning")
    return given


class _CostModel:
    """MACs or parameters of the fused network as a function of its widths.

    Each conv costs ``unit * in_channels * out_channels`` (+ ``out_channels`` biases for
    params), where ``unit`` is k*k for params and k*k*H_out*W_out for MACs (output sizes
    measured once at ``input_size``); the classifier costs ``in * out`` (+ ``out``).
    """

    def __init__(self, model: SelecSLS, flow: tuple[Consumer, ...], metric: str, input_size: Sequence[int] | None):
        self.flow = flow
        self.by_name = {consumer.name: consumer for consumer in flow}
        self.readers = consumers_of(flow)
        self.in_chans = model.spec.in_chans
        self.num_classes = model.num_classes
        self.bias = 1 if metric == "params" else 0
        kernels = {name: k * k for name, _, _, k in model.spec.conv_layers()}
        self.unit = kernels | {CLASSIFIER: 1}
        if metric == "macs":
            self.unit |= {
                name: kernels[name] * pixels for name, pixels in self._output_pixels(model, input_size).items()
            }

    @staticmethod
    @torch.no_grad()
    def _output_pixels(model: SelecSLS, input_size: Sequence[int] | None) -> dict[str, int]:
        modules = dict(model.named_modules())
        pixels: dict[str, int] = {}

        def recorder(name: str):
            def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                pixels[name] = output[0, 0].numel()

            return hook

        hooks = [modules[name].register_forward_hook(recorder(name)) for name, *_ in model.spec.conv_layers()]
        size = tuple(input_size) if input_size is not None else (1, *model.card.preprocessing.input_size)
        was_training = model.training
        try:
            param = next(model.parameters())
            model.eval()(torch.zeros(size, device=param.device, dtype=param.dtype))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        return pixels

    def _in_chs(self, consumer: Consumer, widths: dict[str, int]) -> int:
        return sum(widths[segment.producer] for segment in consumer.inputs) if consumer.inputs else self.in_chans

    def _out_chs(self, name: str, widths: dict[str, int]) -> int:
        return self.num_classes if name == CLASSIFIER else widths[name]

    def total(self, widths: dict[str, int]) -> int:
        return sum(
            (self.unit[c.name] * self._in_chs(c, widths) + self.bias) * self._out_chs(c.name, widths) for c in self.flow
        )

    def saving(self, layer: str, widths: dict[str, int]) -> int:
        """Cost removed by dropping one output channel of ``layer``: its own filter and every reader's column."""
        saved = self.unit[layer] * self._in_chs(self.by_name[layer], widths) + self.bias
        return saved + sum(self.unit[c.name] * self._out_chs(c.name, widths) for c, _ in self.readers[layer])


def _remove_to_budget(
    report: SparsityReport, protected: set[str], cost: _CostModel, fraction: float
) -> dict[str, Tensor]:
    """The channels each layer keeps (indices in the input model) once the least important ones the
    exact pruning kept are dropped, network-wide, until the cost is within budget."""
    keep = dict(report.fixpoint.keep)
    dense = {layer.name: layer.channels for layer in report.layers}
    target = fraction * cost.total(dense)
    widths = {name: len(kept) for name, kept in keep.items()}
    current = cost.total(widths)
    candidates = sorted(
        (float(layer.importance[c]), layer.name, int(c))
        for layer in report.layers
        if layer.name not in protected
        for c in keep[layer.name]
    )
    removed: dict[str, set[int]] = {name: set() for name in keep}
    for _, name, channel in candidates:
        if current <= target:
            break
        if widths[name] > 1:
            current -= cost.saving(name, widths)
            widths[name] -= 1
            removed[name].add(channel)
    if current > target:
        raise ValueError(
            f"cannot prune to {fraction:g} of the cost: with one channel left in every prunable layer it is "
            f"{current / cost.total(dense):.3f}; ask for a larger fraction"
        )
    for name, channels in removed.items():
        if channels:
            keep[name] = torch.tensor([c for c in keep[name].tolist() if c not in channels], dtype=torch.long)
    return keep


@torch.no_grad()
def _build_pruned(model: SelecSLS, keep: dict[str, Tensor], state: dict[str, Tensor]) -> SelecSLS:
    """The smaller fused model: ``model``'s card with the widths of ``keep`` and the sliced fused ``state``."""
    name = model.spec.name if model.spec.name.endswith(PRUNED_SUFFIX) else model.spec.name + PRUNED_SUFFIX
    spec = model.spec.with_widths({layer: len(kept) for layer, kept in keep.items()}, name=name)
    pruned = build(replace(model.card, architecture=spec, fused=True))
    pruned.load_state_dict(state)
    return pruned.to(next(model.parameters()).device).train(model.training)
