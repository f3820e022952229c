"""The study's kinds of step: train, evaluate, prune, bench. Each builder returns a :class:`graph.Step`
whose action is a ``selecsls`` command and whose outputs are the files that command writes
(``selecsls eval --json-out``, ``prune --out``, ``bench --output``): results are read from those
files, never from printed text."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from graph import NotNeeded, Pending, Step, plain_name, selecsls_command
from presets import PILOT_RULES, Preset, Run

import selecsls


@dataclass(frozen=True)
class Study:
    """Where a study runs: its data, its output folder (``--out``/``--preset``) and its settings."""

    data: str
    out: Path
    preset: Preset
    runs: tuple[Run, ...]

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name.replace('/', '-').replace(':', '-')}.log"

    def run(self, name: str) -> Run:
        return next(spec for spec in self.runs if spec.name == name)

    def history(self, name: str) -> list[dict]:
        """A run's per-epoch records (metrics.jsonl), oldest first; empty before its first epoch."""
        path = self.out / name / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finished(self, name: str) -> tuple[Path, Path]:
        """The files a finished run has (its summary and its best model): a later step's inputs."""
        return self.out / name / "summary.json", self.out / name / "best.pt"

    def pilots(self) -> dict:
        ledger = self.out / "pilots.json"
        return json.loads(ledger.read_text()) if ledger.exists() else {}

    def chosen(self, group: str) -> Run:
        """The run a pilot group chose; :class:`Pending` until the choice is made."""
        name = self.pilots().get(group, {}).get("chosen")
        if name is None:
            raise Pending(f"the pilot group {group!r} has not chosen its run yet (step choose:{group})")
        return self.run(name)

    def source(self, group_or_run: str) -> Run:
        """A pilot group's chosen run, or the run of that name."""
        return self.chosen(group_or_run) if group_or_run in PILOT_RULES else self.run(group_or_run)

    def members(self, group_or_run: str) -> tuple[str, ...]:
        """The runs ``--runs`` selects a source's steps by: a group's members, or the run itself."""
        return tuple(spec.name for spec in self.runs if spec.pilot == group_or_run) or (group_or_run,)

    def resume_command(self, steps: str, runs: str = "") -> str:
        """The command that runs ``steps`` (of ``runs``) of this study: what a pending step's message quotes."""
        command = f"python3 references/cifar10/run.py --data {self.data} --out {self.out.parent} --preset "
        command += f"{self.out.name} --steps {steps}"
        return command + (f" --runs {runs}" if runs else "")


def train_step(
    study: Study,
    spec: Run,
    *,
    name: str = "",
    phase: str = "train",
    init: Path | None = None,
    epochs: int | None = None,
    stop_after: int = 0,
    inputs: tuple[Path, ...] | Callable[[], tuple[Path, ...]] = (),
    runs: tuple[str, ...] = (),
) -> Step:
    """``selecsls train`` (resumed from the run folder's ``last.pt``) to the end, or to epoch ``stop_after``;
    from ``init`` (a pruned model: the file says what it is) when given."""
    directory = study.out / spec.name
    preset = study.preset
    command = ["train", "--data", study.data, "--output", str(directory)]
    command += ["--init", str(init)] if init is not None else ["--model", spec.model]
    command += ["--recipe", spec.recipe, "--img-size", str(preset.img_size), "--epochs", str(epochs or preset.epochs)]
    command += ["--batch-size", str(preset.batch_size), "--save-every", str(preset.save_every), "--seed", "0"]
    command += ["--smoothing", "0", "--min-crop-area", "0.35", "--workers", str(preset.workers), "--resume"]
    command += ["--no-progress", *(option.replace("{out}", str(study.out)) for option in preset.training_options)]
    command += list(spec.extra)
    for option, value in (("--stop-after", stop_after), ("--limit", preset.limit), ("--val-limit", preset.val_limit)):
        if value:
            command += [option, str(value)]

    def train(_: Sequence[Path]) -> None:
        started = time.time()
        selecsls_command(command, study.log(spec.name))
        with open(directory / "wall_seconds.txt", "a") as handle:  # one line per (re)start, appended whole
            handle.write(f"{time.time() - started:.0f}\n")

    def done() -> bool:
        return (directory / "summary.json").exists() or bool(stop_after and len(study.history(spec.name)) >= stop_after)

    outputs = (directory / "metrics.jsonl",) if stop_after else (directory / "summary.json",)
    return Step(
        name or f"train:{spec.name}", phase, outputs, train, inputs, runs or (spec.name,), in_place=True, done=done
    )


def write_json(value, path: Path) -> None:
    """``value`` as indented JSON, written whole (``selecsls.atomic_write``)."""
    with selecsls.atomic_write(path, "w") as handle:
        handle.write(json.dumps(value, indent=1) + "\n")


def eval_path(model_file: Path, limit: int | None = None) -> Path:
    """Where the evaluation of ``model_file`` goes (on ``limit`` class-balanced images when given)."""
    return model_file.with_suffix(f".limit-{limit}.eval.json" if limit else ".eval.json")


def eval_step(
    study: Study,
    model_file: Path | Callable[[], Path],
    *,
    phase: str,
    limit: int | None = None,
    target: Path | None = None,
    inputs: tuple[Path, ...] | Callable[[], tuple[Path, ...]] | None = None,
    runs: tuple[str, ...] = (),
) -> Step:
    """``selecsls eval --json-out`` on the study's validation subset (or ``limit`` balanced images),
    into ``target`` (default: beside the model file, :func:`eval_path`). ``model_file`` may be a
    function (a file known once a pilot group has chosen); then give ``target``."""
    limit = limit or study.preset.val_limit
    own_limit = limit if limit != study.preset.val_limit else None

    def resolved() -> Path:
        return model_file() if callable(model_file) else model_file

    def evaluate(outputs: Sequence[Path]) -> None:
        command = ["eval", "--data", study.data, "--checkpoint", str(resolved()), "--workers", "1"]
        command += [*(["--limit", str(limit)] if limit else []), "--json-out", str(outputs[0])]
        selecsls_command(command, study.log(f"eval-{outputs[0].parent.name}"))

    target = target or eval_path(resolved(), own_limit)
    shown = target.relative_to(study.out) if target.is_relative_to(study.out) else target
    return Step(
        f"eval:{shown}", phase, (target,), evaluate, (lambda: (resolved(),)) if inputs is None else inputs, runs
    )


def prune_command(source: Path, target: Path, study: Study, options: Sequence[str] = ()) -> None:
    """``selecsls prune SOURCE --out TARGET`` at the study's image size."""
    command = ["prune", str(source), "--out", str(target), "--img-size", str(study.preset.img_size), *options]
    selecsls_command(command, study.log(f"prune-{plain_name(target)}"))


def bench_step(
    study: Study,
    name: str,
    models: Callable[[], list[str]],
    inputs: Callable[[], tuple[Path, ...]],
    output: Path,
    *,
    phase: str,
    sizes: str,
    backends: str,
    runs: tuple[str, ...] = (),
) -> Step:
    """``selecsls bench`` of ``models`` at batch 1 on one thread, interleaved: output.json and output.png."""

    def bench(outputs: Sequence[Path]) -> None:
        command = ["bench", "--models", ",".join(models()), "--sizes", sizes, "--batch-sizes", "1", "--threads", "1"]
        command += ["--backends", backends, "--warmup", "3", "--repeats", str(study.preset.bench_repeats)]
        command += list(study.preset.bench_options)
        selecsls_command([*command, "--output", str(outputs[0].with_suffix(""))], study.log(name))

    return Step(name, phase, (output, output.with_suffix(".png")), bench, inputs, runs)


def not_chosen(study: Study, spec: Run) -> None:
    """Raise :class:`NotNeeded` for a pilot run its group did not choose (:class:`Pending` before the choice)."""
    if spec.pilot and study.chosen(spec.pilot) != spec:
        raise NotNeeded(f"{spec.name} stops at its pilot epochs: the group {spec.pilot!r} chose another run")
