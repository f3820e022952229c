"""The training loop: build the run, train epoch by epoch, validate, save, report.

Everything a run needs to continue is saved in ``last.pt`` (atomically) at every epoch end
and every ``save_every`` steps: model, optimiser, scheduler, EMA, grad scaler, RNG states
and the position (epoch, batches done). Data order and augmentation are pure functions of
(seed, epoch, index), or with the tensor cache of (seed, epoch, step, process), so a resumed run
replays exactly the batches an uninterrupted run would have seen. Started under ``torchrun``, the
same loop runs DistributedDataParallel.

The parts: :mod:`~selecsls.train.config` (settings), :mod:`~selecsls.train.batches` (image files
or the tensor cache), :mod:`~selecsls.train.distributed` (processes),
:mod:`~selecsls.train.optimization` (the step), :mod:`~selecsls.train.state` (save and resume),
:mod:`~selecsls.train.reporting` (logs, metrics, plots).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from selecsls._io import atomic_write
from selecsls.compress.sparsity import bn_scales, scale_statistics
from selecsls.data.batching import balanced_subset
from selecsls.data.datasets import build_dataset
from selecsls.data.folders import ImageFolder
from selecsls.data.idx import IdxDataset
from selecsls.data.transforms import build_eval_transform, build_train_transform
from selecsls.models.build import build, describe
from selecsls.models.files import identify, read_model_file
from selecsls.models.loading import card_for, materialize
from selecsls.models.validation import check_img_size
from selecsls.train.batches import build_batches
from selecsls.train.config import DEFAULT_MODEL, SettingError, TrainConfig
from selecsls.train.distributed import Workers
from selecsls.train.evaluation import VAL_SUBSET_SEED, evaluate
from selecsls.train.optimization import Optimization
from selecsls.train.ownership import OutputDirectory, owned_output
from selecsls.train.reporting import Reporter, check_dependencies, epoch_line
from selecsls.train.state import (
    DIVERGENCE_FIX,
    Position,
    TrainingDiverged,
    check_finite_weights,
    read_saved_run,
    restore_rng_state,
    save_best,
    save_last,
)

__all__ = ["TrainConfig", "TrainingInterrupted", "train"]

#: An epoch in which more than this fraction of the training images could not be read is refused:
#: the data is broken, and a model trained on what is left would be silently wrong.
MAX_SKIPPED_FRACTION = 0.5
#: Steps between checks that the loss is finite (timm's log interval): a check waits for the device once, so the
#: steps in between queue without a host synchronisation. A check also runs before every save and at each epoch's
#: end, so a non-finite loss stops the run before anything is saved from past it.
LOSS_CHECK_INTERVAL = 50


class StepLoss(NamedTuple):
    """A step's loss, still on the device, until the next check."""

    step: int  # the batch of the epoch (from 0)
    lr: float
    loss: torch.Tensor
    samples: int


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: still a KeyboardInterrupt, saying what was kept and how to go on."""


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the best val top-1 and per-epoch metrics.

    Everything is checked and read (settings, data, model, ``init`` weights, the run to resume) before
    the output directory's earlier results are replaced (:mod:`~selecsls.train.ownership`).
    """
    config.validate()
    check_dependencies(config.progress)
    workers = Workers.start()
    output: OutputDirectory | None = None
    try:
        with owned_output(config, workers) as output:
            run = Run(config, workers)
            output.replace_earlier(run.report.log)
            return run.fit()
    except KeyboardInterrupt:
        raise TrainingInterrupted(output.interrupted() if output is not None else "nothing was written") from None
    except TrainingDiverged as exc:  # said once the directory is settled: what it holds now
        kept = output.kept() if output is not None else "nothing was written"
        raise TrainingDiverged(f"{exc}; {kept}. {DIVERGENCE_FIX}") from None
    finally:
        workers.stop()


def build_model(config: TrainConfig, data: ImageFolder | IdxDataset, saved: dict[str, Any] | None) -> nn.Module:
    """The saved model, the ``init`` file's, or a new one for the classes of the training ``data``.

    The model's card records the training resolution and the class names (``label_names``, when the
    data has them): eval and predict then preprocess the way training did and name the classes,
    from every checkpoint and export.
    """
    if saved is not None:
        file = identify(saved, str(Path(config.output) / "last.pt"))
        return materialize(card_for(file), file)
    num_classes = len(data.classes)
    if config.init:
        file = read_model_file(config.init)
        card = card_for(file, config.model, num_classes=num_classes)
        if config.in_chans not in (3, card.in_chans):  # the default, 3, stands for the file's channels
            raise SettingError(
                f"{{in_chans}} {config.in_chans} does not apply with {{init}}: the model reads the {card.in_chans} "
                f"input channel(s) of {config.init} (images are converted to match); drop {{in_chans}}"
            )
    else:
        file, card = None, describe(config.model or DEFAULT_MODEL, num_classes=num_classes, in_chans=config.in_chans)
    labels = None if data.label_names is None else tuple(data.label_names)
    img_size = config.training_img_size(None if file is None else card.preprocessing.input_size[-1])
    if config.img_size is None and file is not None:  # the recorded size meets {img_size}'s limits at this batch
        try:
            check_img_size(img_size, f"the input size {config.init} records", config.batch_size, training=True)
        except ValueError as exc:
            raise SettingError(f"{exc}; or give {{img_size}}") from None
    card = replace(card.with_image_size(img_size, img_size), label_names=labels)
    return build(card) if file is None else materialize(card, file)


class Run:
    """One training run; ``fit`` trains to the last epoch, resuming from ``last.pt`` if asked."""

    def __init__(self, config: TrainConfig, workers: Workers) -> None:
        self.config, self.workers = config, workers
        self.output = Path(config.output)
        self.report = Reporter(self.output, workers.is_main, config.progress)
        self._prepare_data()
        saved = read_saved_run(config)
        if saved is None and config.resume:
            self.report.log(f"no {self.output / 'last.pt'} yet: starting the run from scratch")
        self.model = self._prepare_model(saved)
        self.optimization = Optimization(self.model, config, self.steps_per_epoch, workers.wrap)
        self.report.log(f"learning rate: {self.optimization.schedule_note}")
        self.position = Position()
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -1.0
        self.skipped_examples: list[str] = []
        self.unchecked: list[StepLoss] = []
        if saved is not None:
            self._restore(saved)
        in_chans, img_size = self.model.card.in_chans, self.model.card.preprocessing.input_size[-1]
        self.report.log(self._size_note(img_size))
        self.batches = build_batches(
            config,
            self.train_data,
            self.val_data,
            build_train_transform(
                img_size, scale=(config.min_crop_area, 1.0), color_jitter=config.color_jitter, in_chans=in_chans
            ),
            build_eval_transform(img_size, in_chans=in_chans),
            workers,
            self.report.log,
            {"train": self.train_indices, "val": self.val_indices},
        )

    def _size_note(self, img_size: int) -> str:
        """Where the training image size comes from."""
        if self.config.img_size is not None:
            return f"training at {img_size}x{img_size} px"
        source = f"the size {self.config.init} records" if self.config.init else "the default"
        return f"training at {img_size}x{img_size} px ({source}; --img-size to change)"

    def _prepare_data(self) -> None:
        """Index lists into the datasets (class-balanced subsets with a limit); transforms are applied per
        (seed, epoch, index)."""
        config, workers = self.config, self.workers
        self.train_data = build_dataset(config.data, "train", label_gaps=config.label_gaps)
        self.val_data = build_dataset(config.data, "val", classes=self.train_data.classes)
        self.train_indices = balanced_subset(self.train_data.targets, config.limit, config.seed)
        self.val_indices = balanced_subset(self.val_data.targets, config.val_limit, VAL_SUBSET_SEED)
        self.train_count = len(self.train_indices)
        self.report.log(
            f"training on {self.train_count} of {len(self.train_data)} images in {self.train_data.source}, "
            f"validating on {len(self.val_indices)} of {len(self.val_data)} in {self.val_data.source}"
        )
        self.steps_per_epoch = self.train_count // workers.world_size // config.batch_size
        if self.steps_per_epoch == 0:
            raise SettingError(
                f"{self.train_count} training images give no full batch of {config.batch_size} per process "
                f"({workers.world_size} processes); lower {{batch_size}} or raise {{limit}}"
            )

    def _prepare_model(self, saved: dict[str, Any] | None) -> nn.Module:
        """The model (restored from ``last.pt`` when resuming) on the run's device, for the data's classes."""
        torch.manual_seed(self.config.seed)
        model = build_model(self.config, self.train_data, saved).to(self.workers.device)
        outputs = getattr(getattr(model, "fc", None), "out_features", None)
        if outputs is not None and outputs != len(self.train_data.classes):  # a class added since the saved run
            raise SettingError(
                f"the saved run predicts {outputs} classes but {{data}} now has {len(self.train_data.classes)}; "
                "resume with the data it was trained on, or fine-tune with {init} into a new {output}"
            )
        return model.to(memory_format=torch.channels_last) if self.config.channels_last else model

    def _restore(self, saved: dict[str, Any]) -> None:
        self.optimization.load_state_dict(saved)
        self.position = Position(**saved["position"])
        self.history = list(saved["history"])
        self.best_top1 = float(saved["best_top1"])
        restore_rng_state(saved["rng"])
        self.report.log(
            f"resumed from {self.output / 'last.pt'}: epoch {self.position.epoch + 1}, "
            f"batch {self.position.step}/{self.steps_per_epoch}"
        )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        last_epoch = min(self.config.epochs, self.config.stop_after or self.config.epochs)
        while self.position.epoch < last_epoch:
            started = time.perf_counter()
            self._train_epoch()
            record = self._training_record()
            check_finite_weights(self.model)  # diverged: said so before validation finds the outputs non-finite
            top1, best_model = self._validate_epoch(record)
            record["epoch_seconds"] = time.perf_counter() - started
            self._end_epoch(record, top1, best_model)
        if self.position.epoch < self.config.epochs:
            self.report.log(
                f"stopped after epoch {self.position.epoch} of {self.config.epochs} as asked; "
                f"continue with --resume ({self.output / 'last.pt'})"
            )
            return {"best_top1": self.best_top1, "stopped_after": self.position.epoch, "output": str(self.output)}
        return self._summary()

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
        return [self.train_indices[i] for i in list(sampler)[self.position.step * self.config.batch_size :]]

    def _train_epoch(self) -> None:
        config, position, optimization = self.config, self.position, self.optimization
        batches = self.batches.train_epoch(position.epoch, self._epoch_order(), position.step, self.workers.rank)
        bar = self.report.epoch_bar(position.epoch, config.epochs, self.steps_per_epoch, position.step)
        optimization.train_model.train()
        while position.step < self.steps_per_epoch:
            start = time.perf_counter()
            images, targets, skipped = next(batches)
            position.skipped += len(skipped)
            self.skipped_examples = (self.skipped_examples + [s.path for s in skipped])[:3]
            # BatchNorm needs two samples; every process must agree to step or all would hang.
            if self.workers.all_agree(len(targets) >= 2):
                loss = optimization.step(images, targets)  # queued on the device: read at the next check
                self.unchecked.append(StepLoss(position.step, optimization.lr, loss, len(targets)))
            optimization.scheduler.step()
            position.step += 1
            position.global_step += 1
            checked = position.global_step % LOSS_CHECK_INTERVAL == 0 or position.step == self.steps_per_epoch
            if checked:
                self._check_losses()  # waits for the device: counted in the step's time
            position.seconds += time.perf_counter() - start
            if bar is not None:
                bar.update()
            if bar is not None and checked:  # the sums are up to date
                bar.set_postfix(
                    loss=f"{position.loss_sum / max(position.samples, 1):.4f}",
                    lr=f"{optimization.lr:.2e}",
                    img_s=f"{position.samples / max(position.seconds, 1e-9):.1f}",
                )
            if (
                config.save_every
                and position.global_step % config.save_every == 0
                and position.step < self.steps_per_epoch
            ):
                self._check_losses()
                self._save_last()
        if bar is not None:
            bar.close()

    def _check_losses(self) -> None:
        """Add the unchecked steps' losses to the epoch's sums once they are known finite in every process.

        One host synchronisation for all of them. Their sums over the processes are compared, so every process
        finds the same first non-finite step and stops alike (one stopping alone would leave the others waiting).
        """
        unchecked, self.unchecked = self.unchecked, []
        if not unchecked:  # the same in every process: they agree on every step taken
            return
        losses = torch.stack([entry.loss for entry in unchecked]).double().cpu().tolist()
        summed = self.workers.sum(losses)
        for entry, loss, total in zip(unchecked, losses, summed):
            if not math.isfinite(total):
                raise TrainingDiverged(
                    f"training diverged at epoch {self.position.epoch + 1}, batch {entry.step + 1}: the loss is "
                    f"{total / self.workers.world_size:g} (lr {entry.lr:.3g})"
                )
            self.position.loss_sum += loss * entry.samples
            self.position.samples += entry.samples

    def _training_record(self) -> dict[str, Any]:
        """The epoch's training figures summed over processes; an epoch that could not read its data stops."""
        position = self.position
        loss_sum, samples, skipped, seconds = self.workers.sum(
            [position.loss_sum, position.samples, position.skipped, position.seconds]
        )
        if skipped:
            self.report.log(f"epoch {position.epoch + 1}: skipped {int(skipped)} unreadable training image(s)")
        if skipped > MAX_SKIPPED_FRACTION * (skipped + samples):
            raise SettingError(
                f"epoch {position.epoch + 1} could not read {int(skipped)} of {int(skipped + samples)} training images "
                f"(e.g. {', '.join(self.skipped_examples) or 'on another process'}); nothing was saved. Fix or remove "
                "the unreadable files in {data}"
            )
        return {
            "epoch": position.epoch + 1,
            "step": position.global_step,
            "lr": self.optimization.lr,
            "train_loss": loss_sum / max(samples, 1),
            "train_images_per_s": samples / max(seconds / self.workers.world_size, 1e-9),
            "train_skipped": int(skipped),
            **scale_statistics(bn_scales(self.model)),  # how sparse the BN scales have become
        }

    def _validate_epoch(self, record: dict[str, Any]) -> tuple[float, nn.Module]:
        """Score the model (and its EMA, which then counts) into ``record``: (top-1, the model it belongs to)."""
        scored, best_model, ema = self._validate(self.model), self.model, self.optimization.ema
        record.update({f"val_{k}": v for k, v in scored.items() if k != "skipped_examples"})
        if ema is not None:
            scored, best_model = self._validate(ema.module), ema.module
            record.update({f"ema_val_{k}": v for k, v in scored.items() if k != "skipped_examples"})
        if scored["skipped"]:
            self.report.log(
                f"epoch {self.position.epoch + 1}: skipped {scored['skipped']} unreadable validation image(s), "
                f"e.g. {scored['skipped_examples']}"
            )
        return scored["top1"], best_model

    def _end_epoch(self, record: dict[str, Any], top1: float, best_model: nn.Module) -> None:
        """Record the epoch, move to the next one and save: ``best.pt`` if it is the best yet, ``last.pt``."""
        self.history.append(record)
        self.report.log(epoch_line(record, self.config.epochs))
        self.position.next_epoch()
        is_best = top1 > self.best_top1
        if is_best:
            self.best_top1 = top1
        if self.workers.is_main:  # the epoch's last step checked its losses (collective) in _train_epoch
            if is_best:
                save_best(self.config, best_model, record)
            self._save_last()
            self.report.write_metrics(self.history)

    def _summary(self) -> dict[str, Any]:
        summary = {
            "model": self.model.card.name,
            "recipe": self.config.recipe,
            "best_top1": self.best_top1,
            "final": self.history[-1],
            "low_gamma_fraction": self.report.sparsity(self.model),
            "output": str(self.output),
        }
        if self.workers.is_main:
            with atomic_write(self.output / "summary.json", "w") as handle:
                json.dump(summary, handle, indent=2)
        self.report.log(f"best val top-1 {self.best_top1:.2f}% -> {self.output / 'best.pt'}")
        return summary

    def _validate(self, model: nn.Module) -> dict[str, Any]:
        self.workers.broadcast_from_main(model)  # every shard must score the same weights and BN statistics
        shard = self.val_indices[self.workers.rank :: self.workers.world_size]
        batches = self.batches.validation(shard)
        return evaluate(model, batches, self.workers.device, self.config.amp, self.config.channels_last)

    def _save_last(self) -> None:
        """Save ``last.pt`` (main process); every process has checked its losses first (:meth:`_check_losses`
        is collective), so nothing past a non-finite loss is saved."""
        if self.workers.is_main:
            state = self.optimization.state_dict()
            save_last(self.config, self.model, state, self.position, self.history, self.best_top1)
