"""The ``cpu`` preset's graph (docs/cifar10.json): the first study, 5,000 images.

The pruning candidates train first; the one with most |gamma| < 1e-3 at its best epoch is pruned
exactly and to half its MACs (or half of what exact pruning left), the latter fine-tuned; both are
timed against the source (benchmarks/prune_latency.py) and the fine-tuned model is deployed to ONNX
(fp32, and int8 calibrated on CIFAR-10) and asked to predict; then the other runs train.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from graph import Pending, Step, StepFailed, selecsls_command
from presets import PRUNE_CANDIDATES, THRESHOLD
from steps import Study, eval_step, prune_command, train_step

import selecsls

LATENCY_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "prune_latency.py"


def graph(study: Study) -> list[Step]:
    candidates = [spec for spec in study.runs if spec.name in PRUNE_CANDIDATES]
    record = study.out / "prune_source.txt"
    exact, budget = study.out / "pruned-1e-3.pt", study.out / "pruned-budget.pt"
    tuned = replace(study.run("sparsity-fast"), name="pruned-budget-finetuned", extra=())
    finetuned = study.out / tuned.name / "best.pt"

    def source() -> Path:
        if not record.exists():
            raise Pending("no pruning source chosen yet (step prune:source)")
        return study.out / record.read_text().strip() / "best.pt"

    def finished(spec):
        return lambda: study.finished(spec.name)

    def finished_candidates() -> tuple[Path, ...]:
        return tuple(path for spec in candidates for path in study.finished(spec.name))

    def choose(outputs: Sequence[Path]) -> None:
        from selecsls.compress.sparsity import bn_scales

        def rank(spec) -> tuple[float, float]:
            scales = bn_scales(selecsls.load(study.out / spec.name / "best.pt"))
            return float((scales < THRESHOLD).float().mean()), max(r["val_top1"] for r in study.history(spec.name))

        outputs[0].write_text(f"{max(candidates, key=rank).name}\n")

    def to_budget(outputs: Sequence[Path]) -> None:
        size = (1, 3, study.preset.img_size, study.preset.img_size)
        left = selecsls.count_macs(selecsls.load(exact), size) / selecsls.count_macs(selecsls.load(source()), size)
        options = ("--target-macs", f"{min(0.5, left / 2):.4f}", "--allow-output-change")
        prune_command(source(), outputs[0], study, options)

    steps = [train_step(study, spec) for spec in candidates]
    steps += [
        Step("prune:source", "prune", (record,), choose, finished_candidates),
        Step(
            "prune:exact",
            "prune",
            (exact,),
            lambda paths: prune_command(source(), paths[0], study),
            lambda: (source(),),
        ),
        Step("prune:budget", "prune", (budget,), to_budget, lambda: (source(), exact)),
        *(_latency(study, pruned, source, size) for pruned in (exact, budget) for size in (study.preset.img_size, 224)),
        eval_step(study, exact, phase="prune"),
        eval_step(study, budget, phase="prune"),
        *(
            eval_step(study, study.out / spec.name / "best.pt", phase="prune", inputs=finished(spec))
            for spec in candidates
        ),
        train_step(study, tuned, phase="prune", init=budget, epochs=study.preset.finetune_epochs, inputs=(budget,)),
        eval_step(study, finetuned, phase="prune"),
        *_deploy(study, finetuned),
    ]
    return [*steps, *(train_step(study, spec) for spec in study.runs if spec not in candidates)]


def _latency(study: Study, pruned: Path, source, size: int) -> Step:
    """Dense, BN-folded and pruned at batch 1 (interleaved, medians), by benchmarks/prune_latency.py."""
    output = study.out / f"latency-{pruned.stem}-{size}px.json"

    def measure(outputs: Sequence[Path]) -> None:
        command = [sys.executable, str(LATENCY_SCRIPT), "--checkpoint", str(source()), "--pruned", str(pruned)]
        command += ["--img-size", str(size), "--repeats", "30", "--json", str(outputs[0])]
        with open(study.log(output.stem), "a") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise StepFailed(f"failed: {' '.join(command)}; see {study.log(output.stem)}")

    return Step(f"latency:{output.stem}", "prune", (output,), measure, lambda: (source(), pruned))


def _deploy(study: Study, model: Path) -> list[Step]:
    """The fine-tuned pruned model exported to ONNX, fp32 and int8 (checked, with its JSON), then predict."""
    images = [str(path) for path in sorted(Path(study.data, "val").glob("*/*.jpg"))[::1000][:6]]
    steps = []
    for name, extra in (("fp32", ()), ("int8", ("--int8", "--calibration", study.data, "--eval-images", "1000"))):
        onnx, record = study.out / f"deployed-{name}.onnx", study.out / f"deployed-{name}.json"

        def export(paths: Sequence[Path], extra=extra, name=name) -> None:
            command = ["export", str(model), "--format", "onnx", "--out", str(paths[0]), "--images", *images, *extra]
            selecsls_command([*command, "--json-out", str(paths[1])], study.log(f"export-{name}"))
            predict = ["predict", *images, "--checkpoint", str(paths[0]), "--topk", "1"]
            selecsls_command(predict, study.log(f"predict-{name}"))

        steps.append(Step(f"deploy:{name}", "deploy", (onnx, record), export, (model,)))
    return steps
