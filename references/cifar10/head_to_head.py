"""The pruning head-to-head: SelecSLS's own pruning against Torch-Pruning on ResNet-50, at equal MACs.

A ResNet's additive skips tie channels across a stage, so pruning one takes a dependency graph
(Torch-Pruning, the field's tool); every SelecSLS skip is a concatenation, so its pruning is a new
spec. At equal MACs (the exact-pruned selecsls42b's, and 50% and 25% of resnet50's) the trained
resnet50 is pruned by Torch-Pruning (BN-scale importance, every dependency group by one ratio) and
the sparse selecsls42b by ``selecsls prune --target-macs``. Every pruned model is fine-tuned the same
steps with its source run's recipe, then scored in fp32 and int8 (ONNX Runtime, ``selecsls export
--int8 --json-out``); batch-1 CPU latency of every model on its fastest fp32 and int8 backend comes
from one interleaved ``selecsls bench``.

Two variants (:data:`VARIANTS`): the first study's sources (resnet50 trained with adamw), and
issue 28's sparse source (resnet50 trained with the ``sparsity`` recipe), timed beside the
exact-pruned selecsls42b.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from graph import Step, selecsls_command
from steps import Study, bench_step, eval_path, eval_step, prune_command, train_step, write_json

import selecsls
from selecsls.train.recipes import get_recipe

#: The MAC targets besides the exact-pruned selecsls42b's: fractions of the trained resnet50's MACs.
RESNET_FRACTIONS = {"resnet-half": 0.5, "resnet-quarter": 0.25}


@dataclass(frozen=True)
class Variant:
    """One head-to-head: its folder, and each family's source (a pilot group or a run)."""

    folder: str
    sources: dict[str, str]


VARIANTS = (
    Variant("head-to-head", {"selecsls42b": "sparse selecsls42b", "resnet50": "resnet50"}),
    Variant("head-to-head-sparse", {"resnet50": "resnet50-sparsity"}),
)


def steps(study: Study, published: Path) -> list[Step]:
    """Both variants' steps; ``published`` (the published exact-pruned selecsls42b) stands in for the
    study's own exact pruning in the variant without a selecsls42b source, while that is not there."""
    return [step for variant in VARIANTS for step in _variant_steps(study, variant, published)]


def _variant_steps(study: Study, variant: Variant, published: Path) -> list[Step]:
    folder, targets = study.out / variant.folder, study.out / variant.folder / "targets.json"
    runs = tuple(name for source in variant.sources.values() for name in study.members(source))

    def exact() -> Path:
        own = study.out / "pruned-1e-3.pt"
        return published if "selecsls42b" not in variant.sources and not own.exists() and published.exists() else own

    def resnet_model() -> tuple[Path, ...]:  # its architecture's MACs: last.pt is there while it trains
        return exact(), study.out / study.source(variant.sources["resnet50"]).name / "last.pt"

    def write_targets(outputs: Sequence[Path]) -> None:
        resnet_macs = _macs(study, resnet_model()[1])
        found = {"exact-selecsls": _macs(study, exact())}
        found |= {label: int(resnet_macs * share) for label, share in RESNET_FRACTIONS.items()}
        write_json(found, outputs[0])

    result = [Step(f"{variant.folder}:targets", "headtohead", (targets,), write_targets, resnet_model, runs)]
    models = []  # (entry, its inputs) in the bench's order
    for family, source in variant.sources.items():
        members = study.members(source)

        def dense(source=source) -> tuple[Path, ...]:
            return study.finished(study.source(source).name)

        models.append((dict(name=f"{family} dense", family=family, file=lambda dense=dense: dense()[1]), dense))
        result += _int8_steps(study, f"{variant.folder}:int8:{family}-dense", dense, members)
        for label in study.preset.head_to_head_targets:
            pruned = folder / f"{family}-{label}.pt"
            run_name = f"{variant.folder}/{family}-{label}-finetuned"

            def prune(outputs: Sequence[Path], family=family, label=label, dense=dense) -> None:
                PRUNERS[family](dense()[1], json.loads(targets.read_text())[label], outputs[0], study)

            def tuned(run_name=run_name) -> tuple[Path, ...]:  # last.pt: the same steps for all, no pick on val
                return study.out / run_name / "summary.json", study.out / run_name / "last.pt"

            result += [
                Step(
                    f"{variant.folder}:prune:{family}-{label}",
                    "headtohead",
                    (pruned,),
                    prune,
                    lambda dense=dense: (targets, *dense()),
                    members,
                ),
                eval_step(study, pruned, phase="headtohead", runs=members),
                _finetune_step(study, run_name, source, pruned, members),
                eval_step(study, tuned()[1], phase="headtohead", inputs=tuned, runs=members),
                *_int8_steps(study, f"{variant.folder}:int8:{family}-{label}", tuned, members),
            ]
            entry = dict(name=f"{family} at {label}", family=family, file=tuned()[1], pruned=pruned)
            models.append((entry, tuned))
    if "selecsls42b" not in variant.sources:  # timed beside the exact-pruned selecsls42b
        scored = folder / "selecsls42b-exact-pruned.eval.json"
        result.append(eval_step(study, exact, phase="headtohead", target=scored, inputs=lambda: (exact(),)))
        entry = dict(name="selecsls42b exact-pruned", family="selecsls42b", file=exact, evaluation=scored)
        models.append((entry, lambda: (exact(),)))
    result += _bench_steps(study, variant, models)
    return result


def _finetune_step(study: Study, run_name: str, source: str, pruned: Path, members: tuple[str, ...]) -> Step:
    """The pruned model fine-tuned ``preset.finetune_epochs`` with its source run's recipe (lr scaled)."""

    def tune(outputs: Sequence[Path]) -> None:
        spec = study.source(source)
        options = finetuning(spec.extra, spec.recipe, study.preset.finetune_lr_factor)
        step = train_step(
            study, replace(spec, name=run_name, extra=options), init=pruned, epochs=study.preset.finetune_epochs
        )
        step.action(step.outputs)

    summary = study.out / run_name / "summary.json"
    return Step(
        f"train:{run_name}", "headtohead", (summary,), tune, (pruned,), members, in_place=True, done=summary.exists
    )


def finetuning(options: Sequence[str], recipe: str, factor: float) -> tuple[str, ...]:
    """The source run's options, its learning rate scaled by ``factor``, no warm-up."""
    options = list(options)
    peak = float(options[options.index("--lr") + 1]) if "--lr" in options else get_recipe(recipe).lr
    return (*options, "--lr", f"{peak * factor:g}", "--warmup-epochs", "0")


def _int8_steps(study: Study, name: str, model_inputs, members: tuple[str, ...]) -> list[Step]:
    """fp32 and int8 (ONNX Runtime, static, calibrated on 128 training images) top-1 on the validation
    split, ``selecsls export --int8 --json-out``: MODEL.int8.onnx and MODEL.int8.json beside the model
    (none where the preset scores no int8)."""

    def outputs() -> tuple[Path, ...]:
        model_file = model_inputs()[1]
        return model_file.with_suffix(".int8.onnx"), model_file.with_suffix(".int8.json")

    def export(paths: Sequence[Path]) -> None:
        command = ["export", str(model_inputs()[1]), "--format", "onnx", "--out", str(paths[0]), "--int8"]
        command += ["--calibration", study.data, "--eval-images", str(study.preset.val_limit or 10000)]
        selecsls_command([*command, "--json-out", str(paths[1])], study.log(name))

    return [Step(name, "headtohead", outputs, export, model_inputs, members)] if study.preset.int8 else []


def _bench_steps(study: Study, variant: Variant, models: list) -> list[Step]:
    """One interleaved ``selecsls bench`` of every model of the variant and resnet50's architecture,
    then models.json: which file is which entry (the report's rows)."""
    folder = study.out / variant.folder

    def entries() -> list[dict]:
        return [
            {key: str(value() if callable(value) else value) for key, value in entry.items()} for entry, _ in models
        ]

    def inputs() -> tuple[Path, ...]:
        return tuple(path for _, needs in models for path in needs())

    def write_entries(outputs: Sequence[Path]) -> None:
        write_json(entries(), outputs[0])

    bench = bench_step(
        study,
        f"{variant.folder}:bench",
        lambda: [*(entry["file"] for entry in entries()), "resnet50"],
        inputs,
        folder / "bench.json",
        phase="headtohead",
        sizes=str(study.preset.img_size),
        backends=study.preset.head_to_head_backends,
    )
    listing = Step(f"{variant.folder}:models", "headtohead", (folder / "models.json",), write_entries, bench.outputs)
    return [bench, listing]


def prune_selecsls(source: Path, macs: int, target: Path, study: Study) -> None:
    """The package's pruning: ``selecsls prune --target-macs`` (a fraction of the source's MACs)."""
    fraction = macs / _macs(study, source)
    prune_command(source, target, study, ("--target-macs", f"{fraction:.6f}", "--allow-output-change"))


def prune_resnet(source: Path, macs: int, target: Path, study: Study) -> None:
    """The baseline: Torch-Pruning's dependency groups, BN-scale importance, one ratio for all, to ``macs``."""
    from selecsls.compress.baseline_pruning import prune_to_macs

    size = (1, 3, study.preset.img_size, study.preset.img_size)
    selecsls.save(prune_to_macs(selecsls.load(source).eval(), macs, size), target)


PRUNERS = {"selecsls42b": prune_selecsls, "resnet50": prune_resnet}


def _macs(study: Study, model_file: Path) -> int:
    """Multiply-accumulates of the model in ``model_file`` at the study's image size, batch 1."""
    return selecsls.count_macs(selecsls.load(model_file), (1, 3, study.preset.img_size, study.preset.img_size))


def collect(out: Path, folder: str) -> list[dict]:
    """One row per model of a head-to-head: its MACs, parameters, top-1 (after pruning, after
    fine-tuning, in int8) and each precision's fastest backend and its median latency at batch 1
    (ms). Empty until its bench has run."""
    if not (out / folder / "bench.json").exists():
        return []
    bench = json.loads((out / folder / "bench.json").read_text())
    fastest = {(row["model"], row["precision"]): row for row in bench["best_vs_best"]}
    rows = []
    for entry in json.loads((out / folder / "models.json").read_text()):
        path, info = Path(entry["file"]), bench["models"][entry["file"]]
        int8 = path.with_suffix(".int8.json")
        row = dict(
            name=entry["name"],
            family=entry["family"],
            file=str(path.relative_to(out) if path.is_relative_to(out) else path),
            params=info["params"],
            macs=next(iter(info["macs_per_image"].values())),
            top1=_top1(Path(entry["evaluation"]) if "evaluation" in entry else eval_path(path)),
            top1_after_pruning=_top1(eval_path(Path(entry["pruned"]))) if "pruned" in entry else None,
            int8_top1=json.loads(int8.read_text())["int8"]["candidate_top1"] if int8.exists() else None,
        )
        for precision in ("fp32", "int8"):
            if (entry["file"], precision) in fastest:
                record = fastest[(entry["file"], precision)]
                row |= {f"{precision}_backend": record["backend"], f"{precision}_ms": 1e3 * record["median_s"]}
        rows.append(row)
    return rows


def _top1(evaluation: Path) -> float | None:
    return json.loads(evaluation.read_text())["top1"] if evaluation.exists() else None
