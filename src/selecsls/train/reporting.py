"""What a run tells the user: log lines, progress bars, metrics.jsonl, the training curve, the sparsity report.

Only the main process reports. Progress bars show on a terminal only; in a log file each epoch
is one JSON line instead.
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

__all__ = ["Reporter", "check_dependencies", "progress_bar", "write_training_curve"]


def check_dependencies(progress: bool) -> None:
    """Fail before training, not after the first epoch, where a package the outputs need is missing."""
    require("matplotlib", "to plot training_curve.png")
    if progress:
        require("tqdm", "for progress bars")


def progress_bar(**options: Any):
    """A tqdm bar that shows on a terminal and stays silent otherwise (no carriage returns in logs)."""
    return require("tqdm", "for progress bars").tqdm(disable=None, dynamic_ncols=True, **options)


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
        """metrics.jsonl and training_curve.png, rewritten from the saved history (so they match last.pt)."""
        with atomic_write(self.output / "metrics.jsonl", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in history)
        write_training_curve(history, self.output / "training_curve.png")

    def sparsity(self, model: nn.Module, threshold: float = 1e-3) -> float | None:
        """Fraction of channels with |gamma| < threshold (pruning candidates); prints the per-layer analysis.

        A fused SelecSLS (e.g. fine-tuned after pruning) is scored by fused filter norm instead;
        a baseline without BatchNorm has nothing to report (None).
        """
        if isinstance(model, SelecSLS):
            report = analyze_sparsity(model, threshold)
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
    """Loss and top-1 per epoch as a PNG."""
    Figure = require("matplotlib.figure", "to plot training_curve.png").Figure
    MaxNLocator = require("matplotlib.ticker", "to plot training_curve.png").MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [r["val_top1"] for r in history], marker="o", label="val top-1")
    if history and "ema_val_top1" in history[0]:
        acc_ax.plot(epochs, [r["ema_val_top1"] for r in history], marker="o", label="EMA val top-1")
    acc_ax.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
