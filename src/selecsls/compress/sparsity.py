"""Which channels a trained SelecSLS no longer uses, and how much each of the others matters.

Adam with L2 regularisation coupled into the gradient drives the BatchNorm scale (gamma)
of unused channels to zero ("implicit filter-level sparsity", Mehta et al., CVPR 2019).
Such a channel's output no longer depends on the input: it is the constant ReLU(beta').
The same holds when the conv filter itself decayed to ~0 under a live gamma, so the criterion is
the L2 norm of the fused filter, gamma / sqrt(var + eps) * W: zero in either case, and the same
number before and after BN fusion. This module measures it per layer and reports what exact
pruning (:mod:`selecsls.compress.fixpoint`) removes, and why; :mod:`selecsls.compress.pruning` acts on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from selecsls._io import atomic_path
from selecsls._optional import require
from selecsls.compress.fixpoint import REASONS, Fixpoint, exact_fixpoint
from selecsls.models.fusion import fold_bn
from selecsls.models.network import ConvNormAct, SelecSLS
from selecsls.models.validation import check_threshold

__all__ = [
    "SCALE_HISTOGRAM_LOG10_EDGES",
    "LayerSparsity",
    "SparsityReport",
    "analyze_sparsity",
    "bn_scale",
    "bn_scales",
    "calibration_activations",
    "calibration_batches",
    "save_scale_histogram",
    "scale_statistics",
]

#: log10 of the |gamma| histogram bin edges: 1e-6 to 10, four bins per decade. Fixed, so the
#: histograms of every epoch and every run line up.
SCALE_HISTOGRAM_LOG10_EDGES = tuple(k / 4 for k in range(-24, 5))


def bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """Per-channel |gamma| of one BatchNorm: the sparsity criterion (on the CPU)."""
    return bn.weight.detach().abs().cpu()


def bn_scales(model: nn.Module) -> Tensor:
    """|gamma| of every BatchNorm2d channel of any model (a baseline too), concatenated; empty without BN."""
    scales = [bn_scale(module) for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    return torch.cat(scales) if scales else torch.empty(0)


def scale_statistics(scales: Tensor, thresholds: tuple[str, ...] = ("1e-3", "1e-2")) -> dict[str, Any]:
    """How sparse a set of |gamma| (e.g. :func:`bn_scales`) is, as JSON-ready fields for a training log.

    ``gamma_below_<t>`` is the fraction of channels below each threshold; ``gamma_histogram``
    counts channels in the bins of :data:`SCALE_HISTOGRAM_LOG10_EDGES` (values beyond the
    outer edges, zero included, count in the outer bins). No channels: no fields.
    """
    if not scales.numel():
        return {}
    values = scales.detach().double().flatten().cpu()
    edges = torch.tensor(SCALE_HISTOGRAM_LOG10_EDGES, dtype=torch.float64)
    log_values = values.clamp_min(10.0 ** edges[0]).log10().clamp(edges[0], edges[-1])
    bins = (torch.bucketize(log_values, edges, right=True) - 1).clamp(0, len(edges) - 2)
    return {
        **{f"gamma_below_{threshold}": float((values < float(threshold)).double().mean()) for threshold in thresholds},
        "gamma_min": float(values.min()),
        "gamma_median": float(values.median()),
        "gamma_histogram": {
            "log10_edges": list(SCALE_HISTOGRAM_LOG10_EDGES),
            "counts": torch.bincount(bins, minlength=len(edges) - 1).tolist(),
        },
    }


@dataclass(frozen=True)
class LayerSparsity:
    """Per-channel measurements of one conv layer (all tensors have one entry per output channel).

    ``scale`` is the L2 norm of the fused filter (gamma / sqrt(var + eps) times the conv filter:
    the pruning criterion). ``importance`` ranks channels for budgeted
    pruning: |gamma| times the BN-normalised filter norm (that is, the fused filter's norm, the
    same number before and after fusion) or, with calibration, the mean activation; divided by
    the layer's mean so that layers of different scale compare fairly (1 = an average channel
    of its layer). ``activation_max`` is the largest post-ReLU value seen on calibration images
    (None without a calibration loader). ``removed`` counts, per reason of
    :data:`~selecsls.compress.fixpoint.REASONS`, the channels exact pruning removes (at its fixpoint).
    """

    name: str
    stage: str
    scale: Tensor
    importance: Tensor
    activation_max: Tensor | None
    threshold: float
    removed: dict[str, int]

    @property
    def channels(self) -> int:
        return self.scale.numel()

    @property
    def kept(self) -> int:
        """Channels exact pruning keeps."""
        return self.channels - sum(self.removed.values())

    @property
    def low_scale(self) -> Tensor:
        """Channels whose output is (nearly) constant in the input model: fused filter norm below the threshold."""
        return self.scale < self.threshold

    @property
    def dead(self) -> Tensor:
        """Channels that were zero after ReLU on every calibration image."""
        if self.activation_max is None:
            return torch.zeros_like(self.scale, dtype=torch.bool)
        return self.activation_max <= 0

    @property
    def inactive(self) -> Tensor:
        return self.low_scale | self.dead


#: The table's column title of each reason a channel is removed for.
REASON_TITLES = {
    "gamma": "gamma~0",
    "filter": "filter~0",
    "dead": "never fired",
    "constant": "const folded",
    "unread": "unread",
}


@dataclass(frozen=True)
class SparsityReport:
    """The per-layer analysis of one model; ``criterion`` names what ``scale`` measures; ``fixpoint``
    is what exact pruning removes (:func:`~selecsls.compress.fixpoint.exact_fixpoint`)."""

    criterion: str
    threshold: float
    calibrated: bool
    layers: tuple[LayerSparsity, ...]
    fixpoint: Fixpoint

    def layer(self, name: str) -> LayerSparsity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no conv layer {name!r} in this report; layers are named like 'features.3.conv2'")

    @property
    def total_channels(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def inactive_channels(self) -> int:
        return sum(int(layer.inactive.sum()) for layer in self.layers)

    @property
    def removed_channels(self) -> int:
        """Channels exact pruning removes, for every reason, at its fixpoint."""
        return sum(layer.channels - layer.kept for layer in self.layers)

    def removals(self) -> dict[str, dict[str, int]]:
        """Layer -> reason (:data:`~selecsls.compress.fixpoint.REASONS`) -> channels exact pruning removes for it."""
        return {layer.name: dict(layer.removed) for layer in self.layers}

    def table(self, kept: dict[str, int] | None = None) -> str:
        """A text table, one row per layer: its channels, how many are below the threshold in the input
        model, how many exact pruning removes for each reason, and how many it keeps (or, given ``kept``,
        layer -> width, those: e.g. after pruning to a budget)."""
        columns = [
            ("channels", lambda layer: layer.channels),
            (f"{self.criterion}<{self.threshold:g}", lambda layer: int(layer.low_scale.sum())),
        ]
        if self.calibrated:
            columns.append(("dead on calib", lambda layer: int(layer.dead.sum())))
        reasons = [reason for reason in REASONS if self.calibrated or reason != "dead"]
        columns += [(REASON_TITLES[reason], lambda layer, r=reason: layer.removed[r]) for reason in reasons]
        columns.append(("kept", lambda layer: layer.kept if kept is None else kept[layer.name]))
        rows = [[layer.name] + [value(layer) for _, value in columns] for layer in self.layers]
        rows.append(["total"] + [sum(row[i] for row in rows) for i in range(1, len(columns) + 1)])
        header = ["layer"] + [title for title, _ in columns]
        widths = [max(len(str(row[i])) for row in [header, *rows]) + 2 for i in range(len(header))]
        return "\n".join(
            f"{row[0]:<{widths[0]}}" + "".join(f"{value:>{w}}" for value, w in zip(row[1:], widths[1:]))
            for row in [header, *rows]
        )


def _conv_layers(model: SelecSLS) -> dict[str, ConvNormAct]:
    """Layer name (as in ``spec.conv_layers()``) -> its ConvNormAct."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name, *_ in model.spec.conv_layers()}


def _stage_names(model: SelecSLS) -> dict[str, str]:
    names = {"stem": "stem"} | {f"head.{i}": "head" for i in range(len(model.spec.head))}
    for number, blocks in enumerate(model.spec.stages(), start=1):
        for i in blocks:
            names |= {f"features.{i}.conv{k}": f"stage{number}" for k in range(1, 7)}
    return names


@torch.no_grad()
def calibration_batches(loader: Iterable) -> Iterator[Tensor]:
    """The image batches of a calibration loader (image batches or (images, labels) tuples)."""
    for batch in loader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                "calibration loader must yield image batches (N, C, H, W) or (images, labels) tuples, "
                f"got {type(images).__name__}"
            )
        yield images


def calibration_activations(model: SelecSLS, loader: Iterable) -> dict[str, tuple[Tensor, Tensor]]:
    """Layer name -> (max, mean) of each channel's post-ReLU output over every calibration batch.

    ``loader`` yields image batches, or tuples whose first item is the batch (as a
    DataLoader over (image, label) pairs does). The model runs in eval mode.
    """
    layers = _conv_layers(model)
    maxima: dict[str, Tensor] = {}
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            per_channel = output.detach().float().transpose(0, 1).flatten(1)
            batch_max, batch_sum = per_channel.amax(1).cpu(), per_channel.sum(1).cpu()
            maxima[name] = torch.maximum(maxima[name], batch_max) if name in maxima else batch_max
            sums[name] = sums[name] + batch_sum if name in sums else batch_sum
            counts[name] += per_channel.shape[1]

        return hook

    device = next(model.parameters()).device
    handles = [module.register_forward_hook(recorder(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for images in calibration_batches(loader):
            model(images.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not maxima:
        raise ValueError("calibration loader yielded no batches; pass a loader with at least one image batch")
    return {name: (maxima[name], sums[name] / counts[name]) for name in layers}


@torch.no_grad()
def analyze_sparsity(model: SelecSLS, threshold: float = 1e-3, loader: Iterable | None = None) -> SparsityReport:
    """Per layer, which channels are inactive: fused filter L2 norm below ``threshold`` (the same
    number with or without BatchNorm) and, with a calibration ``loader``, post-ReLU output zero on
    every calibration image; and how many channels exact pruning removes, for each reason, when
    it repeats its tests until nothing changes (:func:`~selecsls.compress.fixpoint.exact_fixpoint`).
    """
    if not isinstance(model, SelecSLS):
        raise TypeError(f"analyze_sparsity expects a SelecSLS model, got {type(model).__name__}")
    check_threshold("threshold", threshold)
    activations = calibration_activations(model, loader) if loader is not None else {}
    stages = _stage_names(model)
    dead = {name: maximum <= 0 for name, (maximum, _) in activations.items()}
    fixpoint = exact_fixpoint(model, threshold, dead if loader is not None else None)
    layers = []
    for name, module in _conv_layers(model).items():
        has_bn = isinstance(module.bn, nn.BatchNorm2d)
        fused_weight = fold_bn(module.conv, module.bn)[0] if has_bn else module.conv.weight
        fused_norm = fused_weight.detach().float().flatten(1).norm(dim=1).cpu()
        activation_max, activation_mean = activations.get(name, (None, None))
        score = fused_norm if activation_mean is None else activation_mean
        importance = score / score.mean().clamp_min(torch.finfo(score.dtype).tiny)
        removed = {reason: fixpoint.removed[name][reason] for reason in REASONS}
        layers.append(LayerSparsity(name, stages[name], fused_norm, importance, activation_max, threshold, removed))
    return SparsityReport("fused filter norm", threshold, loader is not None, tuple(layers), fixpoint)


def save_scale_histogram(report: SparsityReport, path: str) -> None:
    """Write a PNG with one histogram of the per-channel criterion (fused filter norm) per stage; needs matplotlib."""
    Figure = require("matplotlib.figure", "to plot the scale histogram").Figure

    stages: dict[str, list[Tensor]] = {}
    for layer in report.layers:
        stages.setdefault(layer.stage, []).append(layer.scale)
    fig = Figure(figsize=(7, 2.2 * len(stages)))
    axes = fig.subplots(len(stages), 1, squeeze=False)
    for ax, (stage, scales) in zip(axes[:, 0], stages.items()):
        values = torch.cat(scales)
        inactive = int((values < report.threshold).sum())
        ax.hist(values.numpy(), bins=60, color="tab:blue")
        ax.axvline(report.threshold, color="tab:red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{stage}: {inactive}/{values.numel()} channels below {report.threshold:g}", fontsize=9)
    axes[-1, 0].set_xlabel(report.criterion)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
