"""Everything that changes the weights: optimiser, LR schedule, grad scaler, weight EMA, and the step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from selecsls.train.config import TrainConfig
from selecsls.train.evaluation import autocast_for
from selecsls.train.recipes import WarmupCosine, build_optimizer, get_recipe

__all__ = ["MAX_DEFAULT_WARMUP_FRACTION", "Optimization"]

#: The recipe's warm-up takes at most this fraction of a run's steps: a short run (a 1-epoch fine-tune) would
#: otherwise spend most of it at a tiny learning rate and end near chance. A given ``warmup_epochs`` is kept.
MAX_DEFAULT_WARMUP_FRACTION = 0.1


class Optimization:
    """The optimisation state of ``model`` for ``config``'s recipe over ``steps_per_epoch`` x epochs.

    ``train_model`` is what the forward pass runs: ``wrap(model)`` (e.g. its DDP wrapper, made after the
    EMA copied the bare model); the optimiser, gradient clipping and EMA act on ``model`` itself.
    """

    def __init__(
        self, model: nn.Module, config: TrainConfig, steps_per_epoch: int, wrap: Callable[[nn.Module], nn.Module]
    ) -> None:
        recipe = get_recipe(config.recipe)
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(
            model,
            recipe,
            config.lr if config.lr is not None else recipe.lr,
            config.weight_decay if config.weight_decay is not None else recipe.weight_decay,
        )
        total_steps = config.epochs * steps_per_epoch
        if config.warmup_epochs is not None:  # validated: at most half the run
            warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)
            self.schedule_note = f"warm-up {warmup_steps} of {total_steps} steps"
        else:
            cap = int(MAX_DEFAULT_WARMUP_FRACTION * total_steps)
            warmup_steps = min(round(recipe.warmup_epochs * steps_per_epoch), cap)
            self.schedule_note = (
                f"warm-up {warmup_steps} of {total_steps} steps (the recipe's {recipe.warmup_epochs:g} epoch(s)"
            )
            self.schedule_note += f", at most {MAX_DEFAULT_WARMUP_FRACTION:.0%} of the run; --warmup-epochs to change)"
        self.schedule_note += ", then cosine decay to 0"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema_decay
            else None
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.smoothing)
        self.train_model = wrap(model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One forward/backward/update on a batch (AMP, gradient clipping, EMA); returns the loss, on the device
        (reading it would wait for the device: the loop checks losses in groups)."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device, self.config.amp):
            logits = self.train_model(images)
        loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
