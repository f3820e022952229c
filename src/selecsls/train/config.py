"""The settings of a training run, declared once.

Each field carries its help text (and any argparse options) in its metadata; ``selecsls train``
builds its options from these fields, so the CLI and the library cannot disagree on a default.
Importing this module does not import torch (the CLI builds its parser from it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from selecsls.train.recipes import RECIPES, get_recipe

__all__ = ["DEFAULT_IMG_SIZE", "DEFAULT_MODEL", "SettingError", "TrainConfig", "resolved_path"]

DEFAULT_MODEL = "selecsls42b"
#: The training image side of a new model (the published models' size).
DEFAULT_IMG_SIZE = 224


class SettingError(ValueError):
    """A bad training setting. The message writes settings as ``{name}``: the library shows the field
    name (``img_size``), the CLI its flag (``--img-size``)."""

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each ``{setting}`` written as ``spell(setting)``."""
        names = {f.name for f in fields(TrainConfig)}
        return re.sub(r"\{(\w+)\}", lambda m: spell(m[1]) if m[1] in names else m[0], self.template)


def resolved_path(path: str | None) -> str | None:
    """``path`` as an absolute path with links resolved (None stays None)."""
    return None if path is None else os.path.realpath(path)


def _setting(default: Any = None, help: str | None = None, **argparse_options: Any) -> Any:
    """A field with its command-line help (and argparse options such as ``metavar``) in its metadata."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainConfig:
    """Settings of one training run (the ``selecsls train`` options)."""

    data: str = field(
        metadata={
            "help": "data directory: train/<class>/* and val/<class>/* images (val/ may instead be validation/ "
            "or test/), or MNIST-style IDX files"
        }
    )
    output: str = field(metadata={"help": "where last.pt, best.pt, metrics.jsonl and the curve go", "metavar": "DIR"})
    model: str | None = _setting(help=f"variant name (default {DEFAULT_MODEL}) or a baseline such as resnet50")
    init: str | None = _setting(
        help="fine-tune from this model file (a new class count re-initialises the classifier)", metavar="CHECKPOINT"
    )
    img_size: int | None = _setting(
        help=f"training image side in pixels (default {DEFAULT_IMG_SIZE}; with --init, the size the file records, "
        "as eval and predict use)",
        metavar="PIXELS",
    )
    in_chans: int = _setting(
        3, "input channels of a new model: 3 (grayscale is expanded) or 1; with --init, the file's"
    )
    epochs: int = _setting(10)
    batch_size: int = _setting(64, "per process")
    recipe: str = _setting(
        "sparsity",
        "; ".join(f"{r.name}: {r.description} (lr {r.lr:g}, wd {r.weight_decay:g})" for r in RECIPES.values()),
        choices=tuple(sorted(RECIPES)),
    )
    lr: float | None = _setting(help="peak learning rate (default: the recipe's)")
    weight_decay: float | None = _setting(help="default: the recipe's")
    warmup_epochs: float | None = _setting(help="linear warm-up before the cosine decay (default: the recipe's)")
    smoothing: float = _setting(0.1, "label smoothing")
    ema_decay: float = _setting(0.0, "weight EMA decay, e.g. 0.9998 (0: off); best.pt then holds EMA weights")
    amp: str = _setting("off", "mixed precision (fp16 needs CUDA)", choices=("off", "bf16", "fp16"))
    channels_last: bool = _setting(False, "train and validate in channels-last memory format")
    clip_grad: float | None = _setting(help="clip the gradient norm to NORM", metavar="NORM")
    color_jitter: float = _setting(0.0, "brightness/contrast/saturation jitter strength")
    min_crop_area: float = _setting(0.08, "smallest random-resized-crop area fraction")
    data_cache: str | None = _setting(
        help="decode the images a run uses once into uint8 tensor caches in DIR (built on first use, its size said "
        "first; refused when an image's path, size or modification time changes, a same-size edit that keeps the "
        "modification time is not seen: delete the cache then) and augment whole batches on the training device: "
        "for small images such as CIFAR's",
        metavar="DIR",
    )
    seed: int = _setting(0)
    limit: int | None = _setting(help="train on N training images, class-balanced and drawn with the seed", metavar="N")
    val_limit: int | None = _setting(
        help="validate on N validation images, class-balanced (the same draw for every seed and for eval --limit N)",
        metavar="N",
    )
    label_gaps: bool = _setting(
        False,
        "accept IDX training labels that skip class indices (e.g. 0-9 and a stray 255, refused otherwise): every "
        "index up to the largest becomes a class",
    )
    # How the run is carried out, not what it computes: may change between resumptions.
    resume: bool = _setting(False, "continue the run saved in output/last.pt")
    overwrite: bool = _setting(
        False,
        "start afresh in an output directory holding an earlier run's results: they are replaced once this run "
        "saves its last.pt, and kept if it stops before",
    )
    save_every: int = _setting(0, "also save last.pt every STEPS batches (0: only at epoch ends)", metavar="STEPS")
    stop_after: int | None = _setting(
        help="stop after epoch N of the --epochs schedule (continue later with --resume): a long run in parts",
        metavar="N",
    )
    workers: int = _setting(2, "data-loading processes (0: load in the main process)")
    progress: bool = _setting(True, "progress bars (shown on a terminal only)")

    #: ``label_gaps`` only permits data that is refused without it, so it is not a setting a resumption must match.
    CARRIED_OUT = frozenset(
        {"output", "save_every", "stop_after", "workers", "resume", "overwrite", "progress", "label_gaps"}
    )
    #: Settings naming files: compared (and saved) as resolved absolute paths, so a run resumes from
    #: another working directory or with the same data spelled another way.
    PATHS = frozenset({"data", "init", "data_cache"})

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one (paths resolved; without ``init``, the
        image size a run without ``img_size`` trains at, as runs saved before that default was written)."""
        settings = {
            f.name: resolved_path(getattr(self, f.name)) if f.name in self.PATHS else getattr(self, f.name)
            for f in fields(self)
            if f.name not in self.CARRIED_OUT
        }
        if self.init is None:
            settings["img_size"] = self.training_img_size(None)
        return settings

    def training_img_size(self, recorded: int | None) -> int:
        """The side images are trained at: ``img_size``, else the size the ``init`` file records
        (``recorded``), else :data:`DEFAULT_IMG_SIZE`."""
        return next(size for size in (self.img_size, recorded, DEFAULT_IMG_SIZE) if size is not None)

    def _check_outside_the_images(self) -> None:
        """An output or a cache inside a split's folder would be read as one more class of images."""
        from selecsls.data.datasets import VAL_FOLDERS

        for setting in ("output", "data_cache"):
            value = getattr(self, setting)
            if value is None:
                continue
            place = Path(value).resolve()
            for split in ("train", *VAL_FOLDERS):
                folder = Path(self.data).resolve() / split
                if place == folder or folder in place.parents:
                    raise SettingError(
                        f"{{{setting}}} {value} is inside the data folder {folder}, where it would be read as a "
                        f"class of images: put it outside {{data}}"
                    )

    def validate(self) -> None:
        """Raise :class:`SettingError` for the first bad setting (before any data is read)."""
        import torch

        from selecsls._io import OutputError, check_output
        from selecsls.models.factory import list_models
        from selecsls.models.validation import (
            MAX_SEED,
            check_area_fraction,
            check_color_jitter,
            check_image_channels,
            check_img_size,
            check_int,
            check_number,
        )

        try:  # the range checks name settings as {name}: SettingError spells them per caller
            for name in ("epochs", "batch_size", "limit", "val_limit", "stop_after"):
                if getattr(self, name) is not None:
                    check_int(f"{{{name}}}", getattr(self, name))
            if self.img_size is not None:  # else the init file's size, checked once it is read (train.loop)
                check_img_size(self.img_size, "{img_size}", self.batch_size, training=True, batch_name="{batch_size}")
            check_image_channels("{in_chans}", self.in_chans)
            check_int("{save_every}", self.save_every, low=0)
            check_int("{workers}", self.workers, low=0)
            check_int("{seed}", self.seed, 0, MAX_SEED)
            check_number("{ema_decay}", self.ema_decay, 0.0, 1.0, high_open=True)
            check_number("{smoothing}", self.smoothing, 0.0, 1.0, high_open=True)
            check_color_jitter("{color_jitter}", self.color_jitter)
            check_area_fraction("{min_crop_area}", self.min_crop_area)
            for name in ("lr", "weight_decay", "warmup_epochs", "clip_grad"):  # zero lr or clipping norm: no step
                if getattr(self, name) is not None:
                    check_number(f"{{{name}}}", getattr(self, name), 0.0, low_open=name in ("lr", "clip_grad"))
            check_output(self.output, [self.data, self.init], directory=True)
        except (ValueError, OutputError) as exc:
            raise SettingError(str(exc)) from None
        if self.warmup_epochs is not None and self.warmup_epochs > self.epochs / 2:
            raise SettingError(
                f"{{warmup_epochs}} must be in [0, {self.epochs / 2:g}] (at most half of {{epochs}} {self.epochs}: the "
                f"cosine decay needs the rest), got {self.warmup_epochs:g}"
            )
        self._check_outside_the_images()
        if self.resume and self.overwrite:
            raise SettingError("{resume} continues the run in {output}, {overwrite} replaces it: give one of them")
        if self.amp == "fp16" and not torch.cuda.is_available():
            raise SettingError("{amp} fp16 needs a CUDA device; use {amp} bf16 on CPU")
        get_recipe(self.recipe)
        buildable = list_models(baselines=True)
        if self.model is not None and self.model not in buildable:
            raise SettingError(
                f"{{model}} {self.model!r} is not a model selecsls builds; choose one of " + ", ".join(buildable)
            )
        if self.model in buildable and self.model not in list_models() and self.in_chans != 3:
            raise SettingError(f"baseline {self.model} takes 3 input channels; drop {{in_chans}} {self.in_chans}")
