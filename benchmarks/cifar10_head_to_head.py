"""The CIFAR-10 study's pruning head-to-head: SelecSLS's own pruning against Torch-Pruning on ResNet-50.

A ResNet's additive skips tie channels across a stage, so pruning one takes a dependency graph
(Torch-Pruning, the field's tool); every SelecSLS skip is a concatenation, so its pruning is a new
spec. At equal MACs (the exact-pruned selecsls42b's, and 50% and 25% of resnet50's) the trained
resnet50 is pruned by Torch-Pruning (BN-scale importance, every dependency group by one ratio) and
the sparse selecsls42b by ``selecsls prune --target-macs``. Every pruned model is fine-tuned the same
steps with its source run's recipe, then scored on the validation split in fp32 and int8 (ONNX
Runtime); batch-1 CPU latency of every model on its fastest fp32 and int8 backend comes from one
interleaved ``selecsls bench``. A step whose product exists is skipped, so the step resumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cifar10_runs import Preset, Run, bench, evaluate, model_macs, prune_file, run, selecsls, train

from selecsls._io import atomic_write
from selecsls.train.recipes import get_recipe

#: The MAC targets besides the exact-pruned selecsls42b's: fractions of the trained resnet50's MACs.
RESNET_FRACTIONS = {"resnet-half": 0.5, "resnet-quarter": 0.25}
#: The backends timed: every fp32 and int8 one that runs the network as it is (the bench's best-vs-best
#: table picks each model's fastest per precision).
BACKENDS = "eager,fused,onnxruntime,openvino,int8,openvino_int8"
FOLDER = "head-to-head"


def chosen_runs(out: Path, runs: tuple[Run, ...]) -> dict[str, Run] | None:
    """The pilot groups' chosen runs by model (the sparse selecsls42b, the best resnet50), once both are chosen."""
    ledger = out / "pilots.json"
    pilots = json.loads(ledger.read_text()) if ledger.exists() else {}
    by_name = {spec.name: spec for spec in runs}
    chosen = [by_name.get(pilots.get(group, {}).get("chosen")) for group in ("sparse selecsls42b", "resnet50")]
    if any(spec is None for spec in chosen):
        return None
    return {spec.model: spec for spec in chosen}


def _finished(out: Path, spec: Run) -> bool:
    return (out / spec.name / "summary.json").exists()


def head_to_head(data: str, out: Path, preset: Preset, runs: tuple[Run, ...], names: list[str] | None = None) -> None:
    """Prune, fine-tune, score and time every model of the head-to-head.

    ``names`` limits the pruning, fine-tuning and scoring to the families whose source runs it
    names, so one family's side can run (in its own process) while the other's source still trains;
    the bench runs once every model is ready, from a run without ``names``."""
    sources = chosen_runs(out, runs)
    if sources is None or not (out / "pruned-1e-3.pt").exists():
        print("head-to-head: waiting for the pilot choices and the exact pruning", flush=True)
        return
    try:
        import torch_pruning  # noqa: F401  (the baseline's tool: an optional extra)
    except ImportError:
        print("head-to-head: skipped: Torch-Pruning is not installed (pip install 'selecsls[baseline]')")
        return
    folder = out / FOLDER
    folder.mkdir(exist_ok=True)
    targets = mac_targets(out, sources["resnet50"], preset)
    ours = {model for model, spec in sources.items() if not names or spec.name in names}
    # (entry, the run that must have finished first)
    models = [
        (dict(name=f"{model} dense", family=model, file=out / spec.name / "best.pt"), spec)
        for model, spec in sources.items()
    ]
    models.append((dict(name="selecsls42b exact 1e-3", family="selecsls42b", file=out / "pruned-1e-3.pt"), None))
    for label, macs in targets.items():
        for model, spec in sources.items():
            pruned = folder / f"{model}-{label}.pt"
            tuned = Run(f"{FOLDER}/{model}-{label}-finetuned", spec.model, spec.recipe, finetuning(spec, preset))
            # the model after the same steps (last.pt): no pick on the validation split
            finetuned = out / tuned.name / "last.pt"
            models.append((dict(name=f"{model} at {label}", family=model, file=finetuned, pruned=pruned), tuned))
            if model in ours and _finished(out, spec):
                PRUNERS[model](out / spec.name / "best.pt", macs, pruned, out, preset)
                evaluate(pruned, data, preset, out)
                train(tuned, data, out, preset, init=pruned, epochs=preset.finetune_epochs)
    ready = [needs is None or _finished(out, needs) for _, needs in models]
    pending = [needs.name for (_, needs), done in zip(models, ready) if not done]
    for (entry, _), done in zip(models, ready):  # score what is ready as soon as it is, each family in its process
        if entry["family"] in ours and done:
            evaluate(entry["file"], data, preset, out)
            int8_accuracy(entry["file"], data, preset, out)
    if pending or len(ours) < len(sources):
        print(
            f"head-to-head: the bench waits for {', '.join(pending) or 'a run of this step without --runs'}", flush=True
        )
        return
    (folder / "models.json").write_text(
        json.dumps([{key: str(value) for key, value in entry.items()} for entry, _ in models], indent=1) + "\n"
    )
    bench(
        [*(str(entry["file"]) for entry, _ in models), "resnet50"],
        str(preset.img_size),
        BACKENDS,
        folder / "bench.json",
        out,
        preset,
    )


def finetuning(source: Run, preset: Preset) -> tuple[str, ...]:
    """The source run's options, its learning rate scaled by ``preset.finetune_lr_factor``, no warm-up."""
    options = list(source.extra)
    peak = float(options[options.index("--lr") + 1]) if "--lr" in options else get_recipe(source.recipe).lr
    return (*options, "--lr", f"{peak * preset.finetune_lr_factor:g}", "--warmup-epochs", "0")


def mac_targets(out: Path, resnet: Run, preset: Preset) -> dict[str, int]:
    """The head-to-head's MAC targets: the exact-pruned selecsls42b's and fractions of resnet50's
    (its architecture's MACs: read from ``last.pt`` while it still trains)."""
    directory = out / resnet.name
    resnet_macs = model_macs(directory / ("best.pt" if _finished(out, resnet) else "last.pt"), preset)
    targets = {"exact-selecsls": model_macs(out / "pruned-1e-3.pt", preset)}
    targets |= {label: int(resnet_macs * share) for label, share in RESNET_FRACTIONS.items()}
    # atomic: one family's process may write it while another's does
    with atomic_write(out / FOLDER / "targets.json", "w") as handle:
        handle.write(json.dumps(targets, indent=1) + "\n")
    return targets


def prune_selecsls(source: Path, macs: int, target: Path, out: Path, preset: Preset) -> None:
    """The package's pruning: ``selecsls prune --target-macs`` (a fraction of the source's MACs)."""
    if not target.exists():
        fraction = macs / model_macs(source, preset)
        prune_file(source, target, ("--target-macs", f"{fraction:.6f}", "--allow-output-change"), out, preset)


def prune_resnet(source: Path, macs: int, target: Path, out: Path, preset: Preset) -> None:
    """The baseline: Torch-Pruning's dependency groups, BN-scale importance, one ratio for all, to ``macs``."""
    if target.exists():
        return
    import selecsls
    from selecsls.compress.baseline_pruning import prune_to_macs

    pruned = prune_to_macs(selecsls.load(source).eval(), macs, (1, 3, preset.img_size, preset.img_size))
    selecsls.save(pruned, target)


PRUNERS = {"selecsls42b": prune_selecsls, "resnet50": prune_resnet}

#: What ``selecsls export --int8`` prints after scoring fp32 and int8 on the same validation images.
INT8_LINE = re.compile(r"(\d+) images: fp32 top-1 ([\d.]+)%, int8 top-1 ([\d.]+)%")


def int8_accuracy(model_file: Path, data: str, preset: Preset, out: Path) -> dict:
    """fp32 and int8 (ONNX Runtime, static, calibrated on 128 training images) top-1 on the validation
    split, from ``selecsls export --int8``; cached beside the model file."""
    cached = model_file.with_suffix(".int8.json")
    if not cached.exists():
        onnx = model_file.with_suffix(".int8.onnx")
        command = selecsls("export", str(model_file), "--format", "onnx", "--out", str(onnx), "--int8")
        command += ["--calibration", data, "--eval-images", str(preset.val_limit or 10000)]
        log = out / "logs" / f"int8-{model_file.parent.name}-{model_file.stem}.log"
        run(command, log)
        images, fp32, int8 = INT8_LINE.findall(log.read_text())[-1]
        cached.write_text(json.dumps(dict(images=int(images), fp32_top1=float(fp32), int8_top1=float(int8))) + "\n")
    return json.loads(cached.read_text())


def collect(out: Path) -> list[dict]:
    """One row per model of the head-to-head: its MACs, parameters, top-1 (after pruning, after
    fine-tuning, in int8) and each precision's fastest backend and its median latency at batch 1
    (ms). Empty until the bench has run."""
    folder = out / FOLDER
    if not (folder / "bench.json").exists():
        return []
    bench = json.loads((folder / "bench.json").read_text())
    fastest = {(row["model"], row["precision"]): row for row in bench["best_vs_best"]}
    rows = []
    for entry in json.loads((folder / "models.json").read_text()):
        path, info = Path(entry["file"]), bench["models"][entry["file"]]
        row = dict(
            name=entry["name"],
            family=entry["family"],
            file=str(path.relative_to(out)),
            params=info["params"],
            macs=next(iter(info["macs_per_image"].values())),
            top1=_top1(path),
            top1_after_pruning=_top1(Path(entry["pruned"])) if "pruned" in entry else None,
            int8_top1=json.loads(path.with_suffix(".int8.json").read_text())["int8_top1"],
        )
        for precision in ("fp32", "int8"):
            if (entry["file"], precision) in fastest:
                record = fastest[(entry["file"], precision)]
                row |= {f"{precision}_backend": record["backend"], f"{precision}_ms": 1e3 * record["median_s"]}
        rows.append(row)
    return rows


def _top1(model_file: Path) -> float:
    return json.loads(model_file.with_suffix(".eval.json").read_text())["top1"]
