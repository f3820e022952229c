"""The CIFAR-10 study's building blocks: presets, runs, and the ``selecsls`` commands they run.

Every step is a ``selecsls`` command in its own process (output appended to a log under
``out/logs``); a step whose product exists is skipped, so the study resumes where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

#: Where ``publish`` puts the exact-pruned model in the repository (with images/ beside it), and its size limit.
PUBLISHED_MODEL = Path("examples/cifar10/selecsls42b-pruned.safetensors")
MAX_PUBLISHED_BYTES = 20 * 2**20
#: The class-balanced validation subset the committed model's test re-scores (tests/test_examples.py).
PUBLISHED_CHECK_IMAGES = 1000


@dataclass(frozen=True)
class Preset:
    """What every training run of the study shares (the "same recipe, data, input size, steps")."""

    img_size: int
    limit: int | None  # balanced training subset (None: all 50k)
    val_limit: int | None
    epochs: int
    batch_size: int
    finetune_epochs: int
    save_every: int
    runs: str = "cpu"  # which run list (RUN_LISTS)
    pilot_epochs: int = 0  # a pilot group's runs train this many epochs of the schedule, then one goes on
    training_options: tuple[str, ...] = ()  # e.g. the tensor cache and bf16 on a GPU
    bench_repeats: int = 15  # interleaved timed rounds of the study's latency benchmarks (3 warm-up rounds first)
    workers: int = 1  # training's decoding processes (0 with the tensor cache: nothing to decode)
    # The head-to-head's fine-tuning of a pruned model: its source run's recipe at this fraction of the
    # run's peak learning rate, no warm-up (at the peak the exact-pruned selecsls42b lost 9 points in
    # its first epoch).
    finetune_lr_factor: float = 0.1


#: The full budget: all 50,000 training and 10,000 validation images, 15 epochs of batch 32
#: (23,430 steps) per run, about 3.6 hours of one core per selecsls42b run here; pilot groups first.
FULL_BUDGET = Preset(
    img_size=32,
    limit=None,
    val_limit=None,
    epochs=15,
    batch_size=32,
    finetune_epochs=2,
    save_every=200,
    runs="full",
    pilot_epochs=2,
)
PRESETS = {
    # What the 2-core development CPU affords (selecsls42b trains at ~130 img/s at 32 px on an idle
    # one): 5,000 balanced training images (500 per class), 10 epochs of batch 32 = 1,560 steps per run.
    "cpu": Preset(img_size=32, limit=5000, val_limit=1000, epochs=10, batch_size=32, finetune_epochs=2, save_every=100),
    "full": FULL_BUDGET,
    # The full budget on one GPU: decoded once into the tensor cache (augmented on the GPU; the JPEG
    # path would starve it), bf16, channels-last; every run to the end, side by side
    # (benchmarks/gpu_study.sh), the pilot rules choosing at the end.
    "gpu": replace(
        FULL_BUDGET,
        save_every=2000,
        pilot_epochs=0,
        training_options=("--data-cache", "{out}/tensor-cache", "--amp", "bf16", "--channels-last"),
        workers=0,
    ),
}
#: The gpu preset's every step at a toy size: benchmarks/gpu_study.sh tested end to end on a CPU in minutes.
PRESETS["smoke"] = replace(
    PRESETS["gpu"], limit=40, val_limit=20, epochs=1, batch_size=8, finetune_epochs=1, save_every=5, bench_repeats=2
)


@dataclass(frozen=True)
class Run:
    """One training run: a name, the model and the recipe settings that differ between runs.

    Runs of one ``pilot`` group first train the preset's ``pilot_epochs`` epochs of their full
    schedule; :func:`choose_pilot` then picks the one that goes on (the others stop there)."""

    name: str
    model: str
    recipe: str
    extra: tuple[str, ...] = field(default=())
    question: str = ""
    pilot: str = ""


#: In the order they run: the candidate pruning sources first (the sparsity recipe with stronger
#: settings), then accuracy parity (one recipe for every network), then the other recipes of the
#: sparsity comparison (which also reads parity-selecsls42b, the adamw run).
RUNS = (
    Run("sparsity-strong", "selecsls42b", "sparsity", ("--lr", "3e-3", "--weight-decay", "5e-3"), "sparsity"),
    Run("sparsity-fast", "selecsls42b", "sparsity", ("--lr", "1e-2", "--weight-decay", "5e-3"), "sparsity"),
    Run("parity-selecsls42b", "selecsls42b", "adamw", question="parity"),
    Run("parity-resnet50", "resnet50", "adamw", question="parity"),
    Run("parity-selecsls60", "selecsls60", "adamw", question="parity"),
    Run("sparsity-default", "selecsls42b", "sparsity", question="sparsity"),
    Run("sparsity-sgd", "selecsls42b", "sgd", question="sparsity"),
    Run("sparsity-fast-weak-l2", "selecsls42b", "sparsity", ("--lr", "1e-2", "--weight-decay", "5e-4"), "sparsity"),
    Run("sparsity-mid", "selecsls42b", "sparsity", ("--lr", "5e-3", "--weight-decay", "5e-4"), "sparsity"),
)

#: The full budget, in the order the hours go to them: the two pilot groups (the sparse selecsls42b
#: at the recipe's lr 1e-3 with the default and a 4x stronger L2; resnet50 with adamw and sgd),
#: then the runs the issue asks for if the hours allow.
FULL_RUNS = (
    Run("sparse-l2-5e-4", "selecsls42b", "sparsity", question="sparsity", pilot="sparse selecsls42b"),
    Run("sparse-l2-2e-3", "selecsls42b", "sparsity", ("--weight-decay", "2e-3"), "sparsity", "sparse selecsls42b"),
    Run("resnet50-adamw", "resnet50", "adamw", question="parity", pilot="resnet50"),
    Run("resnet50-sgd", "resnet50", "sgd", question="parity", pilot="resnet50"),
    Run("resnet50-sparsity", "resnet50", "sparsity", question="sparsity"),
    Run("selecsls42b-adamw", "selecsls42b", "adamw", question="parity"),
)
RUN_LISTS = {"cpu": RUNS, "full": FULL_RUNS}


def run(command: list[str], log: Path) -> None:
    """Run one ``selecsls`` command, appending its output to ``log``; stop the study if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(command)}", flush=True)
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")


def selecsls(*args: str) -> list[str]:
    return [sys.executable, "-m", "selecsls", *args]


def train(
    spec: Run,
    data: str,
    out: Path,
    preset: Preset,
    init: Path | None = None,
    epochs: int | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) one run, to its end or to epoch ``stop_after``; returns its directory."""
    directory = out / spec.name
    if (directory / "summary.json").exists() or (stop_after and len(run_history(directory)) >= stop_after):
        return directory
    command = selecsls(
        "train",
        "--data",
        data,
        "--output",
        str(directory),
        "--model",
        spec.model,
        "--recipe",
        spec.recipe,
        "--img-size",
        str(preset.img_size),
        "--epochs",
        str(epochs or preset.epochs),
        "--batch-size",
        str(preset.batch_size),
        "--save-every",
        str(preset.save_every),
        "--seed",
        "0",
        "--smoothing",
        "0",
        "--min-crop-area",
        "0.35",
        "--workers",
        str(preset.workers),
        "--resume",
        "--no-progress",
        *(option.replace("{out}", str(out)) for option in preset.training_options),
        *spec.extra,
    )
    if stop_after:
        command += ["--stop-after", str(stop_after)]
    if preset.limit:
        command += ["--limit", str(preset.limit)]
    if preset.val_limit:
        command += ["--val-limit", str(preset.val_limit)]
    if init is not None:
        command += ["--init", str(init)]
    started = time.time()
    run(command, out / "logs" / f"{spec.name}.log")
    with open(directory / "wall_seconds.txt", "a") as handle:  # one line per (re)start
        handle.write(f"{time.time() - started:.0f}\n")
    return directory


def evaluate(checkpoint: Path, data: str, preset: Preset, out: Path, limit: int | None = None) -> dict:
    """``selecsls eval --json`` on the study's validation subset (or ``limit`` class-balanced
    images), cached beside the checkpoint."""
    limit = limit or preset.val_limit
    cached = checkpoint.with_suffix(f".limit-{limit}.eval.json" if limit != preset.val_limit else ".eval.json")
    if not cached.exists():
        command = selecsls("eval", "--data", data, "--checkpoint", str(checkpoint), "--json", "--workers", "1")
        if limit:
            command += ["--limit", str(limit)]
        log = out / "logs" / f"eval-{checkpoint.parent.name}-{cached.name.removesuffix('.eval.json')}.log"
        run(command, log)
        cached.write_text(_last_json(log))
    return json.loads(cached.read_text())


def _last_json(log: Path) -> str:
    """The JSON object a ``--json`` command printed last in ``log``."""
    text = log.read_text()
    return text[text.rindex("\n{") + 1 :]


def run_history(directory: Path) -> list[dict]:
    """A run's per-epoch records (metrics.jsonl), oldest first; empty before its first epoch."""
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def prune_file(source: Path, target: Path, options: tuple[str, ...], out: Path, preset: Preset) -> None:
    """``selecsls prune SOURCE`` into ``target`` (written under a scratch name, renamed when done)."""
    if target.exists():
        return
    scratch = target.with_name(f".{target.name}")
    command = selecsls("prune", str(source), "--out", str(scratch), "--img-size", str(preset.img_size), *options)
    run(command, out / "logs" / f"prune-{target.stem}.log")
    scratch.replace(target)


def model_macs(model_file: Path, preset: Preset) -> int:
    """Multiply-accumulates of the model in ``model_file`` at the study's image size, batch 1."""
    import selecsls

    return selecsls.count_macs(selecsls.load(model_file), (1, 3, preset.img_size, preset.img_size))


def bench(models: list[str], sizes: str, backends: str, output: Path, out: Path, preset: Preset) -> None:
    """``selecsls bench`` of ``models`` at batch 1 on one thread, interleaved, into ``output`` (JSON + plot)."""
    if output.exists():
        return
    command = selecsls("bench", "--models", ",".join(models), "--sizes", sizes, "--batch-sizes", "1")
    command += ["--threads", "1", "--backends", backends, "--warmup", "3", "--repeats", str(preset.bench_repeats)]
    run([*command, "--output", str(output.with_suffix(""))], out / "logs" / f"{output.stem}.log")
