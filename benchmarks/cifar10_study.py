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
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from cifar10_head_to_head import head_to_head
from cifar10_report import report
from cifar10_runs import (
    MAX_PUBLISHED_BYTES,
    PRESETS,
    PUBLISHED_CHECK_IMAGES,
    PUBLISHED_MODEL,
    RUN_LISTS,
    Preset,
    Run,
    bench,
    evaluate,
    model_macs,
    prune_file,
    run,
    run_history,
    selecsls,
    train,
)

#: Each run list's steps, in the order they run.
STEPS = {"cpu": ("train", "prune", "deploy"), "full": ("train", "prune", "headtohead", "publish")}
#: The fp32 backends the exact-pruned model is timed on beside resnet50 (each model's fastest is compared).
LATENCY_BACKENDS = "eager,fused,tuned,onnxruntime,openvino"
#: The runs the pruning steps may start from: the one with most |gamma| < 1e-3 at its best epoch.
PRUNE_CANDIDATES = ("sparsity-strong", "sparsity-fast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 unpacked by ../shared/data/cifar10.sh")
    parser.add_argument("--out", default="runs/cifar10_study", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--steps",
        help="comma-separated subset of the preset's steps (default: all of them, in order): "
        + "; ".join(f"{runs} presets: {','.join(names)}" for runs, names in STEPS.items()),
    )
    parser.add_argument(
        "--runs",
        help="comma-separated run names: train only these (e.g. one per process); with the headtohead step, "
        "prune and fine-tune only the families these runs are the sources of",
    )
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
    known = STEPS[preset.runs]
    steps = set(args.steps.split(",")) if args.steps else set(known)
    if steps - set(known):
        sys.exit(f"unknown step(s) {sorted(steps - set(known))} in --steps; the {args.preset} preset has {known}")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    selected = [spec for spec in runs if spec.name in names]
    if preset.runs == "full":
        if "train" in steps:
            train_with_pilots(selected, runs, args.data, out, preset)
        if "prune" in steps:
            prune_exactly(args.data, out, preset)
        if "headtohead" in steps:
            head_to_head(args.data, out, preset, runs, names if args.runs else None)
        if "publish" in steps:
            publish(args.data, out, preset)
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
    history = run_history(out / spec.name)
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
        defaults = {item.name: item.default for item in fields(Preset) if item.default is not MISSING}
        recorded = {**json.loads(json.dumps(defaults)), **json.loads(record.read_text())}  # fields added since
        if recorded != json.loads(json.dumps(preset.__dict__)):
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
        best_top1 = max(record["val_top1"] for record in run_history(out / name))
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
    budget = min(0.5, model_macs(out / "pruned-1e-3.pt", preset) / model_macs(source, preset) / 2)
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
    which must not change its top-1 on the 10,000 val images; both scored, then timed beside resnet50
    (batch 1, eager and each model's fastest fp32 backend, BN-folded included, at three sizes). Waits
    (returns) until that run has finished."""
    ledger = out / "pilots.json"
    chosen = json.loads(ledger.read_text()).get("sparse selecsls42b", {}).get("chosen") if ledger.exists() else None
    if chosen is None or not (out / chosen / "summary.json").exists():
        print("prune: waiting for the chosen sparse selecsls42b run to finish", flush=True)
        return
    source = out / chosen / "best.pt"
    (out / "prune_source.txt").write_text(f"{chosen}\n")
    prune_file(source, out / "pruned-1e-3.pt", (), out, preset)
    evaluate(source, data, preset, out)
    evaluate(out / "pruned-1e-3.pt", data, preset, out)
    models = [str(source), str(out / "pruned-1e-3.pt"), "resnet50"]
    bench(
        models, f"{preset.img_size},224,512x320", LATENCY_BACKENDS, out / "bench-pruned-vs-resnet50.json", out, preset
    )


def publish(data: str, out: Path, preset: Preset) -> None:
    """The committed result: the exact-pruned model as ``selecsls.save`` writes it (its weights stored in
    fp16 if fp32 would pass :data:`MAX_PUBLISHED_BYTES`; it loads as fp32), scored on the validation
    split as stored and on the balanced subset its test re-scores, copied into the repository with one
    validation image per class to try it on and what ``selecsls predict`` says about them."""
    pruned = out / "pruned-1e-3.pt"
    if not pruned.exists():
        print("publish: waiting for the exact pruning", flush=True)
        return
    import selecsls

    published = out / f"published{PUBLISHED_MODEL.suffix}"
    if not published.exists():
        model = selecsls.load(pruned)
        scratch = out / f".published{PUBLISHED_MODEL.suffix}"
        selecsls.save(model, scratch)
        if scratch.stat().st_size > MAX_PUBLISHED_BYTES:
            selecsls.save(model.half(), scratch)
        if scratch.stat().st_size > MAX_PUBLISHED_BYTES:
            sys.exit(f"publish: the pruned model takes {scratch.stat().st_size / 2**20:.1f} MiB even in fp16")
        scratch.replace(published)
    evaluate(published, data, preset, out)
    repository = Path(__file__).resolve().parents[1]
    (repository / PUBLISHED_MODEL).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(published, repository / PUBLISHED_MODEL)
    evaluate(published, data, preset, out, limit=PUBLISHED_CHECK_IMAGES)
    images = repository / PUBLISHED_MODEL.parent / "images"
    images.mkdir(exist_ok=True)
    for folder in sorted(Path(data, "val").iterdir()):
        shutil.copyfile(min(folder.glob("*.jpg")), images / f"{folder.name}.jpg")
    from selecsls.deploy.inference import Predictor

    predictions = Predictor.from_model(selecsls.load(published)).predict(sorted(images.glob("*.jpg")), topk=1)
    examples = {Path(p.path).stem: p.classes[0][0] for p in predictions}
    (out / "published-examples.json").write_text(json.dumps(examples, indent=1) + "\n")


def _prune(source: Path, name: str, options: tuple[str, ...], out: Path, preset: Preset) -> None:
    """``selecsls prune`` into out/NAME.pt, then its latency against the source at two sizes."""
    target = out / f"{name}.pt"
    prune_file(source, target, options, out, preset)
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


if __name__ == "__main__":
    main()
