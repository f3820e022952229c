"""The study's graph: every step of a preset, in the order the runner considers them.

Phases (``--steps``) of the full budget (``full``, ``gpu``, ``smoke``): ``train`` (pilot epochs, the
pilot choices, the runs to their end, each scored), ``prune`` (the chosen sparse selecsls42b pruned
at |gamma| 1e-3, scored, timed beside resnet50), ``publish`` (the pruned model into the repository),
``headtohead`` (head_to_head.py), ``fairtest`` (fair_test.py). Of the ``cpu`` preset: ``train``,
``prune`` (exact and to a budget, fine-tuned), ``deploy`` (ONNX fp32 and int8, predict).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import cpu_study
import fair_test
import head_to_head
from graph import Pending, Step, StepFailed
from presets import PILOT_RULES, PUBLISHED_CHECK_IMAGES, PUBLISHED_MODEL
from steps import Study, bench_step, eval_step, not_chosen, prune_command, train_step, write_json

import selecsls


def graph(study: Study, publish_to: Path) -> list[Step]:
    if study.preset.runs == "cpu":
        return cpu_study.graph(study)
    return [
        *_training(study),
        *_exact_pruning(study),
        *_publishing(study, publish_to),
        *head_to_head.steps(study, publish_to / PUBLISHED_MODEL),
        *fair_test.steps(study, publish_to / PUBLISHED_MODEL),
    ]


# ------------------------------------------------------------------------------------ training
def _training(study: Study) -> list[Step]:
    """Pilot epochs, each group's choice, then every run to its end (a pilot run only if chosen),
    each scored as it finishes. Without pilot epochs every run goes to its end and the groups choose there."""
    pilot_epochs = study.preset.pilot_epochs
    first = [
        train_step(study, spec, name=f"pilot:{spec.name}", stop_after=pilot_epochs)
        for spec in study.runs
        if spec.pilot and pilot_epochs
    ]
    rest = []
    for spec in study.runs:
        gated = bool(spec.pilot and pilot_epochs)

        def gate(spec=spec, gated=gated) -> tuple[Path, ...]:
            if gated:
                not_chosen(study, spec)
            return ()

        def finished(spec=spec, gate=gate) -> tuple[Path, ...]:
            return (*gate(), *study.finished(spec.name))

        rest.append(train_step(study, spec, inputs=gate))
        rest.append(
            eval_step(study, study.out / spec.name / "best.pt", phase="train", inputs=finished, runs=(spec.name,))
        )
    groups = dict.fromkeys(spec.pilot for spec in study.runs if spec.pilot)
    choices = [_choose_step(study, group) for group in groups]
    return [*first, *choices, *rest] if pilot_epochs else [*rest, *choices]


def _choose_step(study: Study, group: str) -> Step:
    """The group's run that goes on, by its rule, once every member has its pilot epochs (or, without
    pilot epochs, all its epochs). The ledger, pilots.json, is recomputed from the runs' records (the
    same records give the same choice, so two processes writing it cannot lose a group's entry) and
    written whole."""
    members = [spec for spec in study.runs if spec.pilot == group]
    epochs = study.preset.pilot_epochs or study.preset.epochs

    def inputs() -> tuple[Path, ...]:
        for spec in members:
            if len(study.history(spec.name)) < epochs:
                raise Pending(
                    f"{spec.name} has not trained {epochs} epoch(s) yet: {study.resume_command('train', spec.name)}"
                )
        return tuple(study.out / spec.name / "metrics.jsonl" for spec in members)

    def choose(outputs: Sequence[Path]) -> None:
        pilots = study.pilots()
        for name, rule in PILOT_RULES.items():
            records = {
                spec.name: study.history(spec.name)[epochs - 1 : epochs] for spec in study.runs if spec.pilot == name
            }
            if not records or not all(records.values()):
                continue  # another group, not ready (or chosen earlier from records no longer here: kept)
            records = {run: found[0] for run, found in records.items()}
            best_top1 = max(record["val_top1"] for record in records.values())
            chosen = max(records, key=lambda run: rule(records[run], best_top1))
            pilots[name] = dict(
                epochs=epochs,
                rule=" ".join((rule.__doc__ or "").split()),
                chosen=chosen,
                evidence={
                    run: {k: v for k, v in record.items() if k != "gamma_histogram"} for run, record in records.items()
                },
            )
        write_json(pilots, outputs[0])

    def done() -> bool:
        return group in study.pilots()

    runs = tuple(spec.name for spec in members)
    return Step(f"choose:{group}", "train", (study.out / "pilots.json",), choose, inputs, runs, done=done)


# ------------------------------------------------------------------------------------ pruning
def _exact_pruning(study: Study) -> list[Step]:
    """The chosen sparse selecsls42b (its best epoch) pruned at |gamma| 1e-3, which must not change
    its top-1; scored, then timed beside resnet50 (batch 1, eager and each model's fastest fp32
    backend, BN-folded included)."""
    group = "sparse selecsls42b"
    pruned = study.out / "pruned-1e-3.pt"
    members = study.members(group)

    def source() -> tuple[Path, ...]:
        return study.finished(study.chosen(group).name)

    def prune(outputs: Sequence[Path]) -> None:
        summary, best = source()
        prune_command(best, outputs[0], study)
        outputs[1].write_text(f"{best.parent.name}\n")

    return [
        Step("prune:exact", "prune", (pruned, study.out / "prune_source.txt"), prune, source, members),
        eval_step(study, pruned, phase="prune", runs=members),
        bench_step(
            study,
            "bench:pruned-vs-resnet50",
            lambda: [str(source()[1]), str(pruned), "resnet50"],
            lambda: (*source(), pruned),
            study.out / "bench-pruned-vs-resnet50.json",
            phase="prune",
            sizes=study.preset.latency_sizes,
            backends=study.preset.latency_backends,
            runs=members,
        ),
    ]


# ------------------------------------------------------------------------------------ publishing
def _publishing(study: Study, publish_to: Path) -> list[Step]:
    """The committed result: the exact-pruned model as ``selecsls.save`` writes it (fp16 if fp32 would
    pass the preset's ``published_mib``; it loads as fp32), scored on the validation split and on the
    balanced subset its test re-scores, copied to ``publish_to`` with one validation image per class
    and what the model predicts for them."""
    pruned, published = study.out / "pruned-1e-3.pt", study.out / f"published{PUBLISHED_MODEL.suffix}"
    classes = sorted(folder for folder in Path(study.data, "val").iterdir() if folder.is_dir())
    images = {folder.name: min(folder.glob("*.jpg")) for folder in classes if any(folder.glob("*.jpg"))}
    examples = study.out / "published-examples.json"

    def save(outputs: Sequence[Path]) -> None:
        model, limit = selecsls.load(pruned), study.preset.published_mib * 2**20
        selecsls.save(model, outputs[0])
        if outputs[0].stat().st_size > limit:
            selecsls.save(model.half(), outputs[0])
        if outputs[0].stat().st_size > limit:
            raise StepFailed(f"the pruned model takes {outputs[0].stat().st_size / 2**20:.1f} MiB even in fp16")

    def copy(outputs: Sequence[Path]) -> None:
        from selecsls.deploy.inference import Predictor

        shutil.copyfile(published, outputs[0])
        for image, target in zip(images.values(), outputs[1:-1], strict=True):
            shutil.copyfile(image, target)
        predictions = Predictor.from_model(selecsls.load(published)).predict(list(images.values()), topk=1)
        found = {name: p.classes[0][0] for name, p in zip(images, predictions, strict=True)}
        write_json(found, outputs[-1])

    image_targets = tuple(publish_to / PUBLISHED_MODEL.parent / "images" / f"{name}.jpg" for name in images)
    return [
        Step("publish:model", "publish", (published,), save, (pruned,)),
        eval_step(study, published, phase="publish"),
        eval_step(study, published, phase="publish", limit=PUBLISHED_CHECK_IMAGES),
        Step("publish:copy", "publish", (publish_to / PUBLISHED_MODEL, *image_targets, examples), copy, (published,)),
    ]
