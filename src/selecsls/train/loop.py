"""Training and fine-tuning loop: recipes, EMA, mixed precision, exact resume, DDP.

Everything a run needs to continue is saved in ``last.pt`` (atomically) at every epoch end
and every ``save_every`` steps: model, optimiser, scheduler, EMA, grad scaler, RNG states
and the position (epoch, batches done). Data order and augmentation are pure functions of
(seed, epoch, index), so a resumed run replays exactly the batches an uninterrupted run
would have seen. Started under ``torchrun``, the same loop runs DistributedDataParallel.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data.distributed import DistributedSampler

from selecsls._io import atomic_path, atomic_write
from selecsls.compress.sparsity import analyze_sparsity
from selecsls.data.datasets import TransformedDataset, build_dataset, build_loader
from selecsls.data.transforms import build_eval_transform, build_train_transform
from selecsls.models.checkpoint import read_file
from selecsls.models.factory import create_model, list_models
from selecsls.models.network import SelecSLS
from selecsls.models.serialization import baseline_payload, load, model_from_checkpoint, to_payload
from selecsls.train.evaluation import autocast_for, evaluate
from selecsls.train.recipes import WarmupCosine, build_optimizer, get_recipe

__all__ = ["TrainConfig", "train"]

DEFAULT_MODEL = "selecsls42b"


@dataclass
class TrainConfig:
    """Settings of one training run (the ``selecsls train`` options)."""

    data: str
    output: str
    model: str | None = None  # default selecsls42b; with ``init`` the checkpoint's architecture
    img_size: int = 224
    epochs: int = 10
    batch_size: int = 64  # per process
    recipe: str = "sparsity"
    lr: float | None = None  # default: the recipe's
    weight_decay: float | None = None  # default: the recipe's
    warmup_epochs: float | None = None  # default: the recipe's
    smoothing: float = 0.1
    ema_decay: float = 0.0  # 0 disables the weight EMA
    amp: str = "off"
    channels_last: bool = False
    clip_grad: float | None = None
    color_jitter: float = 0.0
    min_crop_area: float = 0.08
    in_chans: int = 3
    seed: int = 0
    limit: int | None = None
    val_limit: int | None = None
    init: str | None = None
    # How the run is carried out, not what it computes: may change between resumptions.
    save_every: int = 0
    workers: int = 0
    resume: bool = False
    progress: bool = True

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one."""
        carried_out = {"output", "save_every", "workers", "resume", "progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in carried_out}

    def validate(self) -> None:
        positive = {"img_size": self.img_size, "epochs": self.epochs, "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("limit", "val_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0 (0: only at epoch ends), got {self.save_every}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"--smoothing must be in [0, 1), got {self.smoothing}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if self.amp == "fp16" and not torch.cuda.is_available():
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
        get_recipe(self.recipe)
        if self.model in list_models(baselines=True) and self.model not in list_models() and self.in_chans != 3:
            raise ValueError(f"baseline {self.model} takes 3 input channels; drop --in-chans {self.in_chans}")


# ------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Workers:
    """This process's place in the job: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a lone process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def start(cls) -> Workers:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if world_size > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world_size, device)

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def all_agree(self, flag: bool) -> bool:
        """True only if ``flag`` holds in every process (they must take the same branch)."""
        return self.sum([0.0 if flag else 1.0])[0] == 0.0


# ----------------------------------------------------------------------------- state
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


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """One training run; ``fit`` trains to the last epoch, resuming from ``last.pt`` if asked."""

    def __init__(self, config: TrainConfig, workers: Workers) -> None:
        self.config = config
        self.workers = workers
        self.output = Path(config.output)
        self.recipe = get_recipe(config.recipe)
        self.train_data = build_dataset(config.data, "train")
        self.val_data = build_dataset(config.data, "val", classes=self.train_data.classes)
        self.train_count = min(config.limit or len(self.train_data), len(self.train_data))
        self.val_count = min(config.val_limit or len(self.val_data), len(self.val_data))
        self.steps_per_epoch = self.train_count // workers.world_size // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.train_count} training images give no full batch of {config.batch_size} per process "
                f"({workers.world_size} processes); lower --batch-size or raise --limit"
            )
        saved = self._saved_state()
        torch.manual_seed(config.seed)
        self.model = self._build_model(saved)
        self.model.to(workers.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema_decay
            else None
        )
        self.optimizer = build_optimizer(
            self.model,
            self.recipe,
            config.lr if config.lr is not None else self.recipe.lr,
            config.weight_decay if config.weight_decay is not None else self.recipe.weight_decay,
        )
        warmup_epochs = config.warmup_epochs if config.warmup_epochs is not None else self.recipe.warmup_epochs
        total_steps = config.epochs * self.steps_per_epoch
        warmup_steps = min(round(warmup_epochs * self.steps_per_epoch), total_steps // 2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(workers.device.type) if config.amp == "fp16" else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.smoothing)
        self.position = Position()
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -1.0
        if saved is not None:
            self._restore(saved)
        self.train_model: nn.Module = self.model
        if workers.distributed:
            device_ids = [workers.device] if workers.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        in_chans = self.model.pretrained_cfg["input_size"][0] if hasattr(self.model, "pretrained_cfg") else 3
        self.train_transform = build_train_transform(
            config.img_size, scale=(config.min_crop_area, 1.0), color_jitter=config.color_jitter, in_chans=in_chans
        )
        self.eval_transform = build_eval_transform(config.img_size, in_chans=in_chans)

    # ------------------------------------------------------------------ set-up
    def _saved_state(self) -> dict[str, Any] | None:
        last = self.output / "last.pt"
        if self.config.resume and self.workers.is_main:  # temporary files of saves a kill interrupted
            for stale in self.output.glob(".*.tmp"):
                stale.unlink()
        if not last.exists():
            if self.config.resume:
                self._log(f"no {last} yet: starting the run from scratch")
            return None
        if not self.config.resume:
            raise ValueError(
                f"{self.output} already holds a run ({last}); pass --resume to continue it or choose another --output"
            )
        saved = read_file(last)
        differing = {
            key: (saved["config"].get(key), value)
            for key, value in self.config.run_settings().items()
            if saved["config"].get(key) != value
        }
        if differing:
            listed = ", ".join(f"{k} (saved {old!r}, given {new!r})" for k, (old, new) in differing.items())
            raise ValueError(f"--resume continues the run saved in {last} with its settings; these differ: {listed}")
        return saved

    def _build_model(self, saved: dict[str, Any] | None) -> nn.Module:
        num_classes = len(self.train_data.classes)
        if saved is not None:
            return model_from_checkpoint(saved)
        name = self.config.model or DEFAULT_MODEL
        if self.config.init:
            model = load(self.config.init, self.config.model, num_classes=num_classes)
        else:
            model = create_model(name, num_classes=num_classes, in_chans=self.config.in_chans)
        if not isinstance(model, SelecSLS):
            return model
        # Record the training resolution so eval and predict preprocess the same way by default.
        in_chans = model.pretrained_cfg["input_size"][0]
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (in_chans, self.config.img_size, self.config.img_size),
        }
        return model

    def _restore(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.position = Position(**saved["position"])
        self.history = list(saved["history"])
        self.best_top1 = float(saved["best_top1"])
        _set_rng_state(saved["rng"])
        self._log(
            f"resumed from {self.output / 'last.pt'}: epoch {self.position.epoch + 1}, "
            f"batch {self.position.step}/{self.steps_per_epoch}"
        )

    # ---------------------------------------------------------------- training
    def fit(self) -> dict[str, Any]:
        while self.position.epoch < self.config.epochs:
            self._train_epoch()
            self._end_epoch()
        summary = {
            "model": self.model.spec.name if hasattr(self.model, "spec") else self.config.model,
            "recipe": self.config.recipe,
            "best_top1": self.best_top1,
            "final": self.history[-1],
            "low_gamma_fraction": self._report_sparsity(),
            "output": str(self.output),
        }
        if self.workers.is_main:
            with atomic_write(self.output / "summary.json", "w") as handle:
                json.dump(summary, handle, indent=2)
        self._log(f"best val top-1 {self.best_top1:.2f}% -> {self.output / 'best.pt'}")
        return summary

    def _epoch_order(self) -> list[int]:
        """This process's training indices for the current epoch, minus the batches already done."""
        sampler = DistributedSampler(
            range(self.train_count),
            num_replicas=self.workers.world_size,
            rank=self.workers.rank,
            shuffle=True,
            seed=self.config.seed,
            drop_last=True,
        )
        sampler.set_epoch(self.position.epoch)
        return list(sampler)[self.position.step * self.config.batch_size :]

    def _train_epoch(self) -> None:
        config, position = self.config, self.position
        dataset = TransformedDataset(self.train_data, self.train_transform, config.seed, position.epoch)
        loader = build_loader(dataset, self._epoch_order(), config.batch_size, config.workers, drop_last=True)
        batches = iter(loader)
        progress = self._progress(position.step)
        self.train_model.train()
        while position.step < self.steps_per_epoch:
            start = time.perf_counter()
            images, targets, skipped = next(batches)
            position.skipped += len(skipped)
            # BatchNorm needs two samples; every process must agree to step or all would hang.
            if self.workers.all_agree(len(targets) >= 2):
                loss = self._step(images, targets)
                position.loss_sum += loss * len(targets)
                position.samples += len(targets)
            self.scheduler.step()
            position.step += 1
            position.global_step += 1
            position.seconds += time.perf_counter() - start
            if progress is not None:
                progress.update()
                progress.set_postfix(
                    loss=f"{position.loss_sum / max(position.samples, 1):.4f}",
                    lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                    img_s=f"{position.samples / max(position.seconds, 1e-9):.1f}",
                )
            if (
                config.save_every
                and position.global_step % config.save_every == 0
                and position.step < self.steps_per_epoch
            ):
                self._save_last()
        if progress is not None:
            progress.close()

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        device = self.workers.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, self.config.amp):
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
        return float(loss.detach())

    def _end_epoch(self) -> None:
        position = self.position
        loss_sum, samples, skipped, seconds = self.workers.sum(
            [position.loss_sum, position.samples, position.skipped, position.seconds]
        )
        if skipped:
            self._log(f"epoch {position.epoch + 1}: skipped {int(skipped)} unreadable training image(s)")
        record: dict[str, Any] = {
            "epoch": position.epoch + 1,
            "step": position.global_step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / max(samples, 1),
            "train_images_per_s": samples / max(seconds / self.workers.world_size, 1e-9),
            "train_skipped": int(skipped),
        }
        scored = self._validate(self.model)
        record.update({f"val_{k}": v for k, v in scored.items() if k != "skipped_examples"})
        best_model = self.model
        if self.ema is not None:
            ema_scored = self._validate(self.ema.module)
            record.update({f"ema_val_{k}": v for k, v in ema_scored.items() if k != "skipped_examples"})
            scored, best_model = ema_scored, self.ema.module
        if scored["skipped"]:
            self._log(
                f"epoch {position.epoch + 1}: skipped {scored['skipped']} unreadable validation image(s), "
                f"e.g. {scored['skipped_examples']}"
            )
        self.history.append(record)
        self._log(json.dumps(record))
        position.next_epoch()
        is_best = scored["top1"] > self.best_top1
        if is_best:
            self.best_top1 = scored["top1"]
        if self.workers.is_main:
            if is_best:
                self._save_best(best_model, record)
            self._save_last()
            self._write_metrics()

    def _validate(self, model: nn.Module) -> dict[str, Any]:
        if self.workers.distributed:  # every shard must score the same weights and BN statistics
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, 0)
        dataset = TransformedDataset(self.val_data, self.eval_transform)
        shard = range(self.workers.rank, self.val_count, self.workers.world_size)
        loader = build_loader(dataset, shard, self.config.batch_size, self.config.workers)
        return evaluate(model, loader, self.workers.device, self.config.amp, self.config.channels_last)

    # ---------------------------------------------------------------- outputs
    def _save_last(self) -> None:
        """Everything needed to continue; written atomically so a kill never leaves a broken file."""
        if not self.workers.is_main:
            return
        state = {
            **_model_part(self.model, self.config.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": _rng_state(),
            "position": asdict(self.position),
            "epoch": self.position.epoch,
            "step": self.position.global_step,
            "history": self.history,
            "best_top1": self.best_top1,
            "config": self.config.run_settings(),
        }
        with atomic_write(self.output / "last.pt") as handle:
            torch.save(state, handle)

    def _save_best(self, model: nn.Module, record: dict[str, Any]) -> None:
        with atomic_write(self.output / "best.pt") as handle:
            torch.save({**_model_part(model, self.config.model), "epoch": record["epoch"], "metrics": record}, handle)

    def _write_metrics(self) -> None:
        """metrics.jsonl and training_curve.png, rewritten from the saved history (so they match last.pt)."""
        with atomic_write(self.output / "metrics.jsonl", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.history)
        write_training_curve(self.history, self.output / "training_curve.png")

    def _progress(self, done: int):
        if not (self.config.progress and self.workers.is_main):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            initial=done,
            unit="batch",
            dynamic_ncols=True,
            desc=f"epoch {self.position.epoch + 1}/{self.config.epochs}",
        )

    def _log(self, message: str) -> None:
        if self.workers.is_main:
            print(message, flush=True)

    def _report_sparsity(self, threshold: float = 1e-3) -> float | None:
        """Fraction of channels with |gamma| < threshold (pruning candidates); prints the per-layer analysis.

        A fused SelecSLS (e.g. fine-tuned after pruning) is scored by fused filter norm instead;
        a baseline without BatchNorm has nothing to report (None).
        """
        if isinstance(self.model, SelecSLS):
            report = analyze_sparsity(self.model, threshold)
            self._log(report.table())
            low, total, criterion = report.inactive_channels, report.total_channels, report.criterion
        else:
            scales = [m.weight.detach().abs().flatten() for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
            if not scales:
                return None
            all_scales = torch.cat(scales)
            low, total, criterion = int((all_scales < threshold).sum()), all_scales.numel(), "|gamma|"
        fraction = low / max(total, 1)
        self._log(
            f"{low}/{total} channels ({100 * fraction:.1f}%) have {criterion} < {threshold:g} (pruning candidates)"
        )
        return fraction


def _model_part(model: nn.Module, name: str | None) -> dict[str, Any]:
    """The model entries of a checkpoint: ``selecsls.save``'s payload, or name + weights for a baseline."""
    return to_payload(model) if isinstance(model, SelecSLS) else baseline_payload(model, name)


def write_training_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and top-1 per epoch as a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

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


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the best val top-1 and per-epoch metrics."""
    config.validate()
    workers = Workers.start()
    try:
        return Run(config, workers).fit()
    finally:
        workers.stop()
