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
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
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
    runs: str = "cpu"  # which run list (RUN_LISTS)
    pilot_epochs: int = 0  # a pilot group's runs train this many epochs of the schedule, then one goes on
    training_options: tuple[str, ...] = ()  # e.g. the tensor cache and bf16 on a GPU


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
        training_options=("--data-cache", "{out}/tensor-cache", "--amp", "bf16", "--channels-last", "--workers", "0"),
    ),
}


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
#: The runs the pruning steps may start from: the one with most |gamma| < 1e-3 at its best epoch.
PRUNE_CANDIDATES = ("sparsity-strong", "sparsity-fast")

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
    if (directory / "summary.json").exists() or (stop_after and len(_metrics(directory)) >= stop_after):
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
        "1",
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
    parser.add_argument("--steps", default="train,prune,deploy", help="comma-separated subset of steps")
    parser.add_argument("--runs", help="comma-separated run names: train only these (e.g. one per process)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only collect the finished steps into JSON + plots")
    args = parser.parse_args()
    if not Path(args.data, "train").is_dir():
        sys.exit(f"{args.data}/train does not exist: unpack CIFAR-10 first (bash ../shared/data/cifar10.sh DIR)")
    preset = PRESETS[args.preset]
    runs = RUN_LISTS[preset.runs]
    names = args.runs.split(",") if args.runs else [spec.name for spec in runs]
    unknown = sorted(set(names) - {spec.name for spec in runs})
    if unknown:
        sys.exit(f"unknown run(s) {unknown} in --runs; the {args.preset} preset has {[spec.name for spec in runs]}")
    out = args.out / args.preset
    _check_preset(out, preset)
    if args.report:
        report(out, args.data, preset, args.report)
        return
    steps = set(args.steps.split(","))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    selected = [spec for spec in runs if spec.name in names]
    if preset.runs == "full":
        if "train" in steps:
            train_with_pilots(selected, runs, args.data, out, preset)
        if "prune" in steps:
            prune_exactly(args.data, out, preset)
        return
    candidates = [spec for spec in selected if spec.name in PRUNE_CANDIDATES]
    if "train" in steps:
        for spec in candidates:
            train(spec, args.data, out, preset)
    if "prune" in steps:
        prune_and_finetune(args.data, out, preset)
    if "deploy" in steps:
        deploy(args.data, out, preset)
    if "train" in steps:
        for spec in selected:
            if spec not in candidates:
                train(spec, args.data, out, preset)


# ------------------------------------------------------------------------------------ pilots
def train_with_pilots(selected: list[Run], runs: tuple[Run, ...], data: str, out: Path, preset: Preset) -> None:
    """Pilot epochs for every selected pilot run; then each group's choice (once the whole group has
    its pilot epochs: a process that ran one of them waits for the others, run by other processes)
    trains to the end; then the selected runs outside the pilot groups. With no pilot epochs (where
    the hours are cheap) every run trains to the end and the rules choose there."""
    for spec in selected:
        if spec.pilot:
            train(spec, data, out, preset, stop_after=preset.pilot_epochs or None)
    for group in dict.fromkeys(spec.pilot for spec in runs if spec.pilot):
        chosen = choose_pilot(out, runs, group, preset.pilot_epochs or preset.epochs)
        while chosen is None and any(spec.pilot == group for spec in selected):  # a member ran here: wait
            print(f"pilot group {group!r}: waiting for its other runs' pilot epochs", flush=True)
            time.sleep(60)
            chosen = choose_pilot(out, runs, group, preset.pilot_epochs or preset.epochs)
        if chosen in selected:
            train(chosen, data, out, preset)
    for spec in selected:
        if not spec.pilot:
            train(spec, data, out, preset)


def _pilot_record(out: Path, spec: Run, epochs: int) -> dict | None:
    history = _metrics(out / spec.name)
    return history[epochs - 1] if len(history) >= epochs else None


def _sparse_pilot_rank(record: dict, group_best_top1: float) -> tuple:
    """Sparsity without an accuracy cost: within 1 point of the group's best top-1, the most BN
    scales below 1e-2 (those on their way to the pruning threshold), then the smaller median scale."""
    return record["val_top1"] >= group_best_top1 - 1.0, record["gamma_below_1e-2"], -record["gamma_median"]


def _accuracy_pilot_rank(record: dict, group_best_top1: float) -> tuple:
    """The highest val top-1."""
    return (record["val_top1"],)


PILOT_RULES = {"sparse selecsls42b": _sparse_pilot_rank, "resnet50": _accuracy_pilot_rank}


def choose_pilot(out: Path, runs: tuple[Run, ...], group: str, epochs: int) -> Run | None:
    """The group's run that goes on (None until every run of the group has its pilot epochs);
    the choice and its evidence go to out/pilots.json."""
    members = [spec for spec in runs if spec.pilot == group]
    records = {spec.name: _pilot_record(out, spec, epochs) for spec in members}
    if any(record is None for record in records.values()):
        return None
    best_top1 = max(record["val_top1"] for record in records.values())
    rank = PILOT_RULES[group]
    chosen = max(members, key=lambda spec: rank(records[spec.name], best_top1))
    ledger = out / "pilots.json"
    pilots = json.loads(ledger.read_text()) if ledger.exists() else {}
    pilots[group] = dict(
        epochs=epochs,
        rule=(rank.__doc__ or "the highest val top-1").split("\n\n")[0].replace("\n", " ").strip(),
        chosen=chosen.name,
        evidence={
            name: {key: value for key, value in record.items() if key != "gamma_histogram"}
            for name, record in records.items()
        },
    )
    ledger.write_text(json.dumps(pilots, indent=1) + "\n")
    return chosen


def _check_preset(out: Path, preset: Preset) -> None:
    """Runs of other settings in ``out`` must not be resumed or reported as this preset's."""
    record = out / "preset.json"
    if record.exists():
        if json.loads(record.read_text()) != json.loads(json.dumps(preset.__dict__)):
            sys.exit(f"{out} holds runs made with other settings ({record.read_text().strip()}); pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(preset.__dict__) + "\n")


def prune_source(out: Path) -> Path:
    """The candidate whose best checkpoint has the most BN scales below 1e-3 (then: the higher top-1)."""
    import selecsls
    from selecsls.compress.sparsity import bn_scales

    def rank(name: str) -> tuple[float, float]:
        scales = bn_scales(selecsls.load(out / name / "best.pt"))
        best_top1 = max(record["val_top1"] for record in _metrics(out / name))
        return float((scales < 1e-3).float().mean()), best_top1

    return out / max(PRUNE_CANDIDATES, key=rank) / "best.pt"


def prune_and_finetune(data: str, out: Path, preset: Preset) -> None:
    """Prune the sparsity-trained model at 1e-3 (must not change accuracy), then with prune_to_budget
    to half the MACs (or, when exact pruning already left less than that, to half of what it left) and
    fine-tune briefly. Latency of dense, BN-folded and pruned at batch 1, at the trained size and at
    224 px, by benchmarks/prune_latency.py (interleaved, medians)."""
    source = prune_source(out)
    (out / "prune_source.txt").write_text(f"{source.parent.name}\n")
    _prune(source, "pruned-1e-3", (), out, preset)
    budget = min(0.5, _macs(out / "pruned-1e-3.pt", preset) / _macs(source, preset) / 2)
    _prune(source, "pruned-budget", ("--target-macs", f"{budget:.4f}", "--allow-output-change"), out, preset)
    for name in ("pruned-1e-3", "pruned-budget"):
        evaluate(out / f"{name}.pt", data, preset, out)
    evaluate(source, data, preset, out)
    finetuned = train(
        Run("pruned-budget-finetuned", "selecsls42b", "sparsity"),
        data,
        out,
        preset,
        init=out / "pruned-budget.pt",
        epochs=preset.finetune_epochs,
    )
    evaluate(finetuned / "best.pt", data, preset, out)


def prune_exactly(data: str, out: Path, preset: Preset) -> None:
    """The full budget's pruning: the chosen sparse selecsls42b (its best epoch) pruned at |gamma| 1e-3,
    which must not change its top-1 on the 10,000 val images; both scored, latency of dense, BN-folded
    and pruned. Waits (returns) until that run has finished."""
    ledger = out / "pilots.json"
    chosen = json.loads(ledger.read_text()).get("sparse selecsls42b", {}).get("chosen") if ledger.exists() else None
    if chosen is None or not (out / chosen / "summary.json").exists():
        print("prune: waiting for the chosen sparse selecsls42b run to finish", flush=True)
        return
    source = out / chosen / "best.pt"
    (out / "prune_source.txt").write_text(f"{chosen}\n")
    _prune(source, "pruned-1e-3", (), out, preset)
    evaluate(source, data, preset, out)
    evaluate(out / "pruned-1e-3.pt", data, preset, out)


def _macs(model_file: Path, preset: Preset) -> int:
    import selecsls

    return selecsls.count_macs(selecsls.load(model_file), (1, 3, preset.img_size, preset.img_size))


def _prune(source: Path, name: str, options: tuple[str, ...], out: Path, preset: Preset) -> None:
    """``selecsls prune`` into out/NAME.pt, then its latency against the source at two sizes."""
    target = out / f"{name}.pt"
    if not target.exists():
        scratch = out / f".{name}.pt"
        command = selecsls("prune", str(source), "--out", str(scratch), "--img-size", str(preset.img_size), *options)
        run(command, out / "logs" / f"{name}.log")
        scratch.replace(target)
    for size in (preset.img_size, 224):
        latency = out / f"latency-{name}-{size}px.json"
        if not latency.exists():
            script = Path(__file__).with_name("prune_latency.py")
            command = [sys.executable, str(script), "--checkpoint", str(source), "--pruned", str(target)]
            command += ["--img-size", str(size), "--repeats", "30", "--json", str(latency)]
            run(command, out / "logs" / f"latency-{name}-{size}px.log")


def deploy(data: str, out: Path, preset: Preset) -> None:
    """The pruned model exported to ONNX (fp32, checked) and int8 (calibrated on CIFAR-10), then predict."""
    model = out / "pruned-budget-finetuned" / "best.pt"
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


# ------------------------------------------------------------------------------------ report
def _metrics(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sparsity_measures(run_dir: Path, data: str, preset: Preset, images: int = 500) -> dict:
    """How much of the run's best model is off, by the numbers: channels with |gamma| < 1e-3; channels
    zero after ReLU on every one of ``images`` balanced val images (activation-measured); and what
    exact pruning at 1e-3 would keep of the MACs, with the output change it causes. Cached in the run."""
    cached = run_dir / "sparsity_measures.json"
    if not cached.exists():
        import selecsls
        from selecsls.data.datasets import TransformedDataset, balanced_subset, build_loader
        from selecsls.data.transforms import eval_transform_for
        from selecsls.train.evaluation import validation_data

        model = selecsls.load(run_dir / "best.pt").eval()
        dataset = validation_data(data, model)
        loader = build_loader(
            TransformedDataset(dataset, eval_transform_for(model.card.preprocessing)),
            balanced_subset(dataset.targets, images, 0),
            100,
            0,
        )
        analysis = selecsls.analyze_sparsity(model, 1e-3, loader)
        pruned = selecsls.prune(model, 1e-3, max_output_change=None)
        size = (1, 3, preset.img_size, preset.img_size)
        result = dict(
            channels=analysis.total_channels,
            gamma_below_1e_3=sum(int(layer.low_scale.sum()) for layer in analysis.layers),
            dead_on_val=sum(int(layer.dead.sum()) for layer in analysis.layers),
            val_images=images,
            pruned_macs_fraction=selecsls.count_macs(pruned, size) / selecsls.count_macs(model, size),
            pruned_output_change=pruned.output_change,
        )
        cached.write_text(json.dumps(result) + "\n")
    return json.loads(cached.read_text())


def report(out: Path, data: str, preset: Preset, destination: Path) -> None:
    """Collect every finished step into ``destination`` (JSON) and plots beside it; print the tables."""
    runs = {}
    figures = destination.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    for spec in RUN_LISTS[preset.runs]:
        history = _metrics(out / spec.name)
        finished = (out / spec.name / "summary.json").exists()
        if not history or not (finished or preset.pilot_epochs):  # the full budget reports runs in progress
            continue
        wall = out / spec.name / "wall_seconds.txt"
        runs[spec.name] = dict(
            model=spec.model,
            recipe=spec.recipe,
            settings=list(spec.extra),
            question=spec.question,
            finished=finished,
            epochs=[{key: value for key, value in record.items() if key != "gamma_histogram"} for record in history],
            best_top1=max(record["val_top1"] for record in history),
            images_per_s=sorted(record["train_images_per_s"] for record in history)[len(history) // 2],
            wall_seconds=sum(float(line) for line in wall.read_text().split()) if wall.exists() else None,
        )
        if spec.model.startswith("selecsls") and finished:
            runs[spec.name]["sparsity"] = sparsity_measures(out / spec.name, data, preset)
        histograms = out / spec.name / "gamma_histograms.png"
        if spec.question == "sparsity" and histograms.exists():
            shutil.copyfile(histograms, figures / f"gamma-{spec.name}.png")
    evaluations = {
        str(path.relative_to(out)).removesuffix(".eval.json"): json.loads(path.read_text())
        for path in sorted(out.rglob("*.eval.json"))
    }
    latency = {
        path.stem.removeprefix("latency-"): json.loads(path.read_text()) for path in sorted(out.glob("latency-*.json"))
    }
    source = out / "prune_source.txt"
    pilots = out / "pilots.json"
    result = dict(
        preset=preset.__dict__,
        runs=runs,
        pilots=json.loads(pilots.read_text()) if pilots.exists() else {},
        prune_source=source.read_text().strip() if source.exists() else None,
        evaluations=evaluations,
        latency=latency,
        cpu=_cpu(),
    )
    destination.write_text(json.dumps(result, indent=1) + "\n")
    _plot(runs, figures)
    _print_tables(result)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown"


def _plot(runs: dict, folder: Path) -> None:
    """folder/curves.png: val top-1 per epoch (all runs); for runs with BN, the smallest / median |gamma|
    and the fraction of |gamma| below the pruning threshold 1e-3 (sparsity vs epoch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    accuracy_ax, scale_ax, sparsity_ax = fig.subplots(1, 3)
    for name, run_result in runs.items():
        records = run_result["epochs"]
        epochs = [record["epoch"] for record in records]
        (line,) = accuracy_ax.plot(epochs, [record["val_top1"] for record in records], marker="o", label=name)
        if "gamma_min" not in records[0]:
            continue
        color = line.get_color()
        for key, style in (("gamma_min", "-"), ("gamma_median", "--")):
            values = [record[key] for record in records]
            label = name if key == "gamma_min" else None  # one legend entry per run: the colour
            scale_ax.plot(epochs, values, linestyle=style, marker="o", markersize=3, color=color, label=label)
        below = [100 * record["gamma_below_1e-3"] for record in records]
        sparsity_ax.plot(epochs, below, marker="o", color=color, label=name)
    accuracy_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="CIFAR-10 validation accuracy")
    scale_ax.axhline(1e-3, color="grey", linewidth=0.8, label="pruning threshold 1e-3")
    scale_ax.set(xlabel="epoch", ylabel="|gamma|", yscale="log", title="BN scales: smallest (solid) and median")
    sparsity_ax.set(xlabel="epoch", ylabel="% of BN channels", title="sparsity: |gamma| < 1e-3")
    for ax in (accuracy_ax, scale_ax, sparsity_ax):
        ax.legend(fontsize=6, loc="lower left" if ax is scale_ax else "best")
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)


def _print_tables(result: dict) -> None:
    print("| run | model | recipe | settings | best val top-1 | images/s | wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        wall = run_result["wall_seconds"]
        print(
            f"| {name} | {run_result['model']} | {run_result['recipe']} | {' '.join(run_result['settings']) or '-'} | "
            f"{run_result['best_top1']:.1f}% | {run_result['images_per_s']:.1f} | "
            f"{'-' if wall is None else f'{wall / 60:.1f} min'} |"
        )
    print("\n| run | epoch | val top-1 | |gamma|<1e-3 | |gamma|<1e-2 | min |gamma| | median |gamma| |")
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        for record in run_result["epochs"]:
            if "gamma_min" in record:
                below = [f"{100 * record[f'gamma_below_{t}']:.2f}%" for t in ("1e-3", "1e-2")]
                print(
                    f"| {name} | {record['epoch']} | {record['val_top1']:.1f}% | {below[0]} | {below[1]} "
                    f"| {record['gamma_min']:.2e} | {record['gamma_median']:.3f} |"
                )
    print(
        "\n| run | best val top-1 | channels | |gamma| < 1e-3 | zero after ReLU on 500 val images "
        "| MACs left by exact pruning at 1e-3 | its output change |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, run_result in result["runs"].items():
        if "sparsity" in run_result:
            measures = run_result["sparsity"]
            print(
                f"| {name} | {run_result['best_top1']:.1f}% | {measures['channels']} | "
                f"{measures['gamma_below_1e_3']} | {measures['dead_on_val']} | "
                f"{100 * measures['pruned_macs_fraction']:.1f}% | "
                f"{measures['pruned_output_change']:.1e} |"
            )
    print("\n| model file | val top-1 | images |")
    print("|---|---|---|")
    for name, evaluation in result["evaluations"].items():
        print(f"| {name} | {evaluation['top1']:.2f}% | {evaluation['images']} |")
    print("\n| pruned @ size | params dense -> pruned | GMACs | dense ms | BN folded ms | pruned ms | pruned/folded |")
    print("|---|---|---|---|---|---|---|")
    for name, figures in result["latency"].items():
        dense, fused, pruned = (figures["models"][key] for key in ("dense", "fused", "pruned"))
        print(
            f"| {name} | {dense['params']:,} -> {pruned['params']:,} | {dense['gmacs']:.4g} -> {pruned['gmacs']:.4g} | "
            f"{dense['median_ms']:.2f} | {fused['median_ms']:.2f} | {pruned['median_ms']:.2f} | "
            f"{pruned['median_ms'] / fused['median_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
