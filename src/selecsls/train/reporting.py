"""What a run tells the user: log lines, progress bars, metrics.jsonl, the training curve, the sparsity report.

Only the main process reports. Progress bars show on a terminal only. Each epoch ends with one line
a person reads (epoch, loss, top-1, time); every figure of it is in metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from selecsls._io import atomic_path, atomic_write
from selecsls._optional import require
from selecsls.compress.sparsity import analyze_sparsity, bn_scales
from selecsls.models.network import SelecSLS

__all__ = [
    "Reporter",
    "check_dependencies",
    "epoch_line",
    "progress_bar",
    "write_gamma_histograms",
    "write_training_curve",
]


def check_dependencies(progress: bool) -> None:
    """Fail before training, not after the first epoch, where a package the outputs need is missing."""
    require("matplotlib", "to plot training_curve.png")
    if progress:
        require("tqdm", "for progress bars")


def progress_bar(**options: Any):
    """A tqdm bar that shows on a terminal and stays silent otherwise (no carriage returns in logs)."""
    return require("tqdm", "for progress bars").tqdm(disable=None, dynamic_ncols=True, **options)


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The end-of-epoch log line: the numbers a person reads first; the rest is in metrics.jsonl."""
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"train loss {record['train_loss']:.4f}",
        f"val loss {record['val_loss']:.4f}",
        f"top-1 {record['val_top1']:.2f}%",
    ]
    if "ema_val_top1" in record:
        parts.append(f"EMA top-1 {record['ema_val_top1']:.2f}%")
    minutes, seconds = divmod(round(record.get("epoch_seconds", 0.0)), 60)
    parts += [f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s", f"lr {record['lr']:.2e}"]
    return "  ".join(parts)


class Reporter:
    """Prints (main process only) and writes the per-epoch outputs of a run into ``output``."""

    def __init__(self, output: Path, is_main: bool, progress: bool) -> None:
        self.output, self.is_main, self.progress = output, is_main, progress

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def epoch_bar(self, epoch: int, epochs: int, steps: int, done: int):
        """The progress bar of one epoch, or None where nothing is shown."""
        if not (self.progress and self.is_main):
            return None
        return progress_bar(total=steps, initial=done, unit="batch", desc=f"epoch {epoch + 1}/{epochs}")

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """metrics.jsonl, training_curve.png and gamma_histograms.png, rewritten from the saved history
        (so they match last.pt)."""
        with atomic_write(self.output / "metrics.jsonl", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in history)
        write_training_curve(history, self.output / "training_curve.png")
        write_gamma_histograms(history, self.output / "gamma_histograms.png")

    def sparsity(self, model: nn.Module, threshold: float = 1e-3) -> float | None:
        """Fraction of channels whose fused filter norm is below threshold (pruning candidates, the criterion
        of :func:`~selecsls.compress.sparsity.analyze_sparsity`, fused or not); prints the per-layer analysis.

        A baseline is scored by |gamma|; one without BatchNorm has nothing to report (None).
        """
        if isinstance(model, SelecSLS):
            report = analyze_sparsity(model, threshold)
            if report.inactive_channels:  # a table of zeros says nothing the summary line does not
                self.log(report.table())
            low, total, criterion = report.inactive_channels, report.total_channels, report.criterion
        else:
            scales = bn_scales(model)
            if not scales.numel():
                return None
            low, total, criterion = int((scales < threshold).sum()), scales.numel(), "|gamma|"
        fraction = low / max(total, 1)
        self.log(
            f"{low}/{total} channels ({100 * fraction:.1f}%) have {criterion} < {threshold:g} (pruning candidates)"
        )
        return fraction


def write_training_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, top-1 and BN-scale sparsity per epoch as a PNG."""
    Figure = require("matplotlib.figure", "to plot training_curve.png").Figure
    MaxNLocator = require("matplotlib.ticker", "to plot training_curve.png").MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(15, 4))
    loss_ax, acc_ax, sparsity_ax = fig.subplots(1, 3)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [r["val_top1"] for r in history], marker="o", label="val top-1")
    if history and "ema_val_top1" in history[0]:
        acc_ax.plot(epochs, [r["ema_val_top1"] for r in history], marker="o", label="EMA val top-1")
    acc_ax.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    acc_ax.legend()
    _plot_sparsity(sparsity_ax, [r for r in history if "gamma_min" in r])
    for ax in (loss_ax, acc_ax, sparsity_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_sparsity(ax, history: list[dict[str, Any]]) -> None:
    """% of BN channels with |gamma| below 1e-3 and 1e-2 (left axis); min and median |gamma| (right, log)."""
    ax.set(xlabel="epoch", ylabel="% of BN channels", title="BN scale sparsity")
    if not history:
        ax.text(0.5, 0.5, "no BatchNorm scales recorded", ha="center", va="center", transform=ax.transAxes)
        return
    epochs = [r["epoch"] for r in history]
    highest = 0.0
    for threshold, colour in (("1e-3", "tab:red"), ("1e-2", "tab:orange")):
        values = [100 * r[f"gamma_below_{threshold}"] for r in history]
        ax.plot(epochs, values, marker="o", color=colour, label=f"|gamma| < {threshold}")
        highest = max(highest, *values)
    ax.set_ylim(0, max(1.0, 1.1 * highest))  # 0% reads as 0%, not as a zoomed-in flat line
    scale_ax = ax.twinx()
    scale_ax.plot(epochs, [r["gamma_min"] for r in history], linestyle="--", color="tab:blue", label="min |gamma|")
    scale_ax.plot(epochs, [r["gamma_median"] for r in history], linestyle="--", color="tab:green", label="median")
    scale_ax.set(yscale="log", ylabel="|gamma|")
    lines = ax.get_legend_handles_labels()
    scale_lines = scale_ax.get_legend_handles_labels()
    ax.legend(lines[0] + scale_lines[0], lines[1] + scale_lines[1], fontsize=8)


def write_gamma_histograms(history: list[dict[str, Any]], path: Path) -> None:
    """The |gamma| histogram of every epoch overlaid (early pale, late dark) as a PNG; nothing without BN."""
    recorded = [r for r in history if "gamma_histogram" in r]
    if not recorded:
        return
    Figure = require("matplotlib.figure", "to plot gamma_histograms.png").Figure
    colormap = require("matplotlib", "to plot gamma_histograms.png").colormaps["viridis_r"]

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for index, record in enumerate(recorded):
        histogram = record["gamma_histogram"]
        edges = [10.0**edge for edge in histogram["log10_edges"]]
        shade = colormap(0.15 + 0.85 * index / max(len(recorded) - 1, 1))
        ax.stairs(histogram["counts"], edges, color=shade, label=f"epoch {record['epoch']}")
    for threshold in (1e-3, 1e-2):
        ax.axvline(threshold, color="tab:red", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="symlog", xlabel="|gamma| (outer bins include values beyond them)", ylabel="channels")
    ax.set_title("BatchNorm |gamma| per epoch (dotted: 1e-3 and 1e-2)")
    handles, labels = ax.get_legend_handles_labels()
    keep = sorted({0, len(handles) // 2, len(handles) - 1})  # a legend of every epoch would hide the plot
    ax.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
