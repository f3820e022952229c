"""What a run saves and resumes from: ``last.pt`` (everything needed to continue) and ``best.pt``.

Both are ordinary model files (``selecsls.load`` reads them) written atomically, so a kill at any
moment leaves the previous complete save.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selecsls._io import atomic_write
from selecsls.models.files import read_file, to_payload
from selecsls.models.layouts import non_finite
from selecsls.train.config import SettingError, TrainConfig, resolved_path

__all__ = [
    "Position",
    "DIVERGENCE_FIX",
    "TrainingDiverged",
    "check_finite_weights",
    "read_saved_run",
    "restore_rng_state",
    "save_best",
    "save_last",
]


@dataclass
class Position:
    """Where the run is, plus the running sums of the epoch in progress."""

    epoch: int = 0
    step: int = 0  # batches of ``epoch`` already trained
    global_step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def next_epoch(self) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum, self.samples, self.skipped, self.seconds = 0.0, 0, 0, 0.0


def read_saved_run(config: TrainConfig) -> dict[str, Any] | None:
    """The ``last.pt`` to continue, or None for a fresh run.

    A saved run is continued only with ``resume`` and only with the same settings (paths compared
    resolved). Whether a fresh run may use the directory is decided before, when the run takes it
    (:mod:`selecsls.train.ownership`).
    """
    last = Path(config.output) / "last.pt"
    if not config.resume or not last.exists():
        return None
    saved = read_file(last)
    if not isinstance(saved.get("config"), dict):
        raise SettingError(f"{last} is not a training checkpoint (no saved settings); it cannot be resumed")
    saved_settings = {
        key: resolved_path(value) if key in config.PATHS and isinstance(value, str) else value
        for key, value in saved["config"].items()
    }
    differing = {
        key: (saved_settings.get(key), value)
        for key, value in config.run_settings().items()
        # no {img_size} with {init}: the resumed model keeps the size its last.pt records (runs saved before
        # that default existed recorded 224)
        if saved_settings.get(key) != value and not (key == "img_size" and value is None)
    }
    if differing:
        listed = ", ".join(f"{k} (saved {old!r}, given {new!r})" for k, (old, new) in differing.items())
        raise SettingError(f"{{resume}} continues the run saved in {last} with its settings; these differ: {listed}")
    return saved


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: the run stops, its last saves stay as they were."""


#: What to change after a divergence (:func:`selecsls.train.loop.train` adds it, after what the directory holds).
DIVERGENCE_FIX = "Lower the learning rate (--lr) or clip the gradients (--clip-grad)"


def check_finite_weights(model: nn.Module) -> None:
    """Refuse to save non-finite weights: a diverged model must never replace a good best.pt or last.pt."""
    bad = non_finite(model.state_dict())
    if bad:
        raise TrainingDiverged(
            f"training diverged: the weights hold NaN or infinity ({bad[0]}, {len(bad)} tensor(s)), so they were not "
            "saved"
        )


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(
    config: TrainConfig,
    model: nn.Module,
    optimization: dict[str, Any],
    position: Position,
    history: list[dict[str, Any]],
    best_top1: float,
) -> None:
    """Everything needed to continue: the model, ``optimization`` (optimiser, scheduler, EMA and grad
    scaler states), RNG states, position, history and the settings a resumption must match."""
    state = {
        **to_payload(model),
        **optimization,
        "rng": _rng_state(),
        "position": asdict(position),
        "epoch": position.epoch,
        "step": position.global_step,
        "history": history,
        "best_top1": best_top1,
        "config": config.run_settings(),
    }
    check_finite_weights(model)
    with atomic_write(Path(config.output) / "last.pt") as handle:
        torch.save(state, handle)


def save_best(config: TrainConfig, model: nn.Module, record: dict[str, Any]) -> None:
    """The best model so far with its epoch's metrics."""
    check_finite_weights(model)
    with atomic_write(Path(config.output) / "best.pt") as handle:
        torch.save({**to_payload(model), "epoch": record["epoch"], "metrics": record}, handle)
