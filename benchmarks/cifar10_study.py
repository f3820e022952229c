"""The CIFAR-10 study: accuracy parity, implicit sparsity, pruning with no loss, deployment.

Every step is a ``selecsls`` command run in its own process, so the study is resumable: a
finished step (its ``summary.json`` or output file exists) is skipped, an interrupted training
continues from its ``last.pt`` (``--resume``; runs save every ``--save-every`` steps). Run it in the
background and re-run the same command after an interruption::

    bash ../shared/data/cifar10.sh /data/cifar10          # once: 50k train / 10k val JPEGs
    nohup python3 benchmarks/cifar10_study.py --data /data/cifar10 > study.log 2>&1 &
    python3 benchmarks/cifar10_study.py --data /data/cifar10 --report docs/cifar10.json

The report step collects every run into one small JSON (docs/cifar10.json), the plots under
docs/cifar10/ and prints the tables of docs/cifar10.md. ``--preset gpu`` is the full-length version
(all 50k images, more epochs) for a machine with a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


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


PRESETS = {
    # Sized from measured cost on the 2-core development CPU (see docs/cifar10.md).
    "cpu": Preset(img_size=32, limit=10000, val_limit=2000, epochs=15, batch_size=64, finetune_epochs=3, save_every=50),
    "gpu": Preset(
        img_size=32, limit=None, val_limit=None, epochs=30, batch_size=128, finetune_epochs=5, save_every=200
    ),
}


@dataclass(frozen=True)
class Run:
    """One training run: a name, the model and the recipe settings that differ between runs."""

    name: str
    model: str
    recipe: str
    extra: tuple[str, ...] = field(default=())
    question: str = ""


#: Accuracy parity: the same recipe for every network.
PARITY = (
    Run("parity-selecsls42b", "selecsls42b", "adamw", question="parity"),
    Run("parity-selecsls60", "selecsls60", "adamw", question="parity"),
    Run("parity-resnet50", "resnet50", "adamw", question="parity"),
)
#: Implicit sparsity: Adam + coupled L2 (sparsity recipe, at two strengths) vs decoupled / SGD.
SPARSITY = (
    Run("sparsity-default", "selecsls42b", "sparsity", question="sparsity"),
    Run("sparsity-strong", "selecsls42b", "sparsity", ("--lr", "3e-3", "--weight-decay", "2e-3"), "sparsity"),
    Run("sparsity-adamw", "selecsls42b", "adamw", question="sparsity"),
    Run("sparsity-sgd", "selecsls42b", "sgd", question="sparsity"),
)
#: The sparsity-trained model that the pruning steps start from.
PRUNE_SOURCE = "sparsity-strong"


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


def train(spec: Run, data: str, out: Path, preset: Preset, init: Path | None = None, epochs: int | None = None) -> Path:
    """Train (or resume) one run; returns its directory."""
    directory = out / spec.name
    if (directory / "summary.json").exists():
        return directory
    command = selecsls(
        "train", "--data", data, "--output", str(directory), "--model", spec.model, "--recipe", spec.recipe,
        "--img-size", str(preset.img_size), "--epochs", str(epochs or preset.epochs),
        "--batch-size", str(preset.batch_size), "--save-every", str(preset.save_every),
        "--seed", "0", "--smoothing", "0", "--min-crop-area", "0.35", "--workers", "1", "--resume", "--no-progress",
        *spec.extra,
    )  # fmt: skip
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


def evaluate(checkpoint: Path, data: str, preset: Preset, out: Path) -> dict:
    """``selecsls eval --json`` on the study's validation subset, cached beside the checkpoint."""
    cached = checkpoint.with_suffix(".eval.json")
    if not cached.exists():
        command = selecsls("eval", "--data", data, "--checkpoint", str(checkpoint), "--json", "--workers", "1")
        if preset.val_limit:
            command += ["--limit", str(preset.val_limit)]
        log = out / "logs" / f"eval-{checkpoint.parent.name}-{checkpoint.stem}.log"
        run(command, log)
        cached.write_text(_last_json(log))
    return json.loads(cached.read_text())


def _last_json(log: Path) -> str:
    """The JSON object a ``--json`` command printed last in ``log``."""
    text = log.read_text()
    return text[text.rindex("\n{") + 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 unpacked by ../shared/data/cifar10.sh")
    parser.add_argument("--out", default="runs/cifar10_study", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", default="parity,sparsity,prune,deploy", help="comma-separated subset of steps")
    args = parser.parse_args()
    if not Path(args.data, "train").is_dir():
        sys.exit(f"{args.data}/train does not exist: unpack CIFAR-10 first (bash ../shared/data/cifar10.sh DIR)")
    preset = PRESETS[args.preset]
    out = args.out / args.preset
    steps = set(args.steps.split(","))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if "parity" in steps:
        for spec in PARITY:
            train(spec, args.data, out, preset)
    if "sparsity" in steps:
        for spec in SPARSITY:
            train(spec, args.data, out, preset)
    if "prune" in steps:
        prune_and_finetune(args.data, out, preset)
    if "deploy" in steps:
        deploy(args.data, out, preset)


def prune_and_finetune(data: str, out: Path, preset: Preset) -> None:
    """Prune the sparsity-trained model at 1e-3 (must not change accuracy), then to half the MACs
    and fine-tune briefly; latency is measured by ``selecsls prune`` at the trained size and at 224."""
    source = out / PRUNE_SOURCE / "best.pt"
    for name, extra in (("pruned-1e-3", ()), ("pruned-half-macs", ("--target-macs", "0.5"))):
        target = out / f"{name}.pt"
        for size in (preset.img_size, 224):
            log = out / "logs" / f"{name}-{size}px.log"
            if not log.exists():
                scratch = out / f".{name}-{size}.pt"
                run(
                    selecsls(
                        "prune", str(source), "--out", str(scratch), "--img-size", str(size), "--repeats", "20", *extra
                    ),
                    log,
                )
                scratch.replace(target) if size == preset.img_size else scratch.unlink()
        evaluate(target, data, preset, out)
    evaluate(source, data, preset, out)
    finetuned = train(
        Run("pruned-half-macs-finetuned", "selecsls42b", "sparsity"),
        data,
        out,
        preset,
        init=out / "pruned-half-macs.pt",
        epochs=preset.finetune_epochs,
    )
    evaluate(finetuned / "best.pt", data, preset, out)


def deploy(data: str, out: Path, preset: Preset) -> None:
    """The pruned model exported to ONNX (fp32, checked) and int8 (calibrated on CIFAR-10), then predict."""
    model = out / "pruned-half-macs-finetuned" / "best.pt"
    images = sorted(Path(data, "val").glob("*/*.jpg"))[::1000][:6]
    for name, extra in (("fp32", ()), ("int8", ("--int8", "--calibration", data, "--eval-images", "1000"))):
        target = out / f"deployed-{name}.onnx"
        if not target.exists():
            run(
                selecsls(
                    "export",
                    str(model),
                    "--format",
                    "onnx",
                    "--out",
                    str(target),
                    "--images",
                    *map(str, images),
                    *extra,
                ),
                out / "logs" / f"export-{name}.log",
            )
        run(
            selecsls("predict", *map(str, images), "--checkpoint", str(target), "--topk", "1"),
            out / "logs" / f"predict-{name}.log",
        )


if __name__ == "__main__":
    main()
