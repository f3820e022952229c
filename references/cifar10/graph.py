"""A small build runner: the study's steps as a declared graph, each run only when it is out of date.

Why not Make: several steps only know their inputs once an earlier step has run (the pilot
choice names the run that is pruned; the MAC targets are read from models), a step that needs
another process's training must say so in words rather than fail on a missing file, and the
study has to run wherever the package does (no make on a bare Windows or a slim CI image).
What is kept from Make is the contract:

- a step declares its inputs (files, or a function that names them once they can be known: it
  raises :class:`Pending` while they cannot) and its outputs;
- it runs only when an output is missing or older than an input (or, for a step whose
  completion is not a file's presence, when its ``done`` test says so);
- its outputs appear whole or not at all: the step writes them under scratch names
  (:func:`scratch`) and the runner renames them once the step has succeeded. Training is the
  exception (``in_place``): ``selecsls train`` writes its run folder itself, atomically, and
  resumes from it;
- nothing waits or polls: a step whose inputs another process is still making is reported as
  pending, with what it waits for, and the runner goes on with the steps it can run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The exit status of a study command some of whose steps wait for inputs (the others ran).
EXIT_PENDING = 3


class Pending(Exception):
    """A step's inputs do not exist yet; the message says what it waits for and how to make it."""


class NotNeeded(Exception):
    """A step the study does not need after all (a pilot run that was not chosen); the message says why."""


class StepFailed(RuntimeError):
    """A step's command failed or did not write its outputs."""


@dataclass(frozen=True)
class Step:
    """One node of the graph.

    ``action`` receives the paths to write (the outputs' scratch names, or the outputs themselves
    when ``in_place``). Outputs, like inputs, may be a function: for files beside a model that is
    known only once a pilot group has chosen it. ``runs`` names the training runs the step belongs
    to (``--runs`` selects by them; a step of no run belongs to every selection), ``phase`` the
    ``--steps`` group it is part of."""

    name: str
    phase: str
    outputs: tuple[Path, ...] | Callable[[], tuple[Path, ...]]
    action: Callable[[Sequence[Path]], None]
    inputs: tuple[Path, ...] | Callable[[], tuple[Path, ...]] = ()
    runs: tuple[str, ...] = ()
    in_place: bool = False
    done: Callable[[], bool] | None = None

    def resolved_inputs(self) -> tuple[Path, ...]:
        return self.inputs() if callable(self.inputs) else self.inputs

    def resolved_outputs(self) -> tuple[Path, ...]:
        return self.outputs() if callable(self.outputs) else self.outputs

    def up_to_date(self, inputs: Iterable[Path], outputs: Sequence[Path]) -> bool:
        if self.done is not None:
            return self.done()
        if not all(path.exists() for path in outputs):
            return False
        oldest_output = min((path.stat().st_mtime for path in outputs), default=float("inf"))
        return all(path.stat().st_mtime <= oldest_output for path in inputs if path.is_file())


def scratch(path: Path) -> Path:
    """Where a step writes ``path`` before the runner renames it: a hidden sibling, same suffix, named
    by the process (two processes of the study may make the same file; each renames a whole one)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def plain_name(path: Path) -> str:
    """The stem of the output a :func:`scratch` path stands for (of any other path: its stem), for log names."""
    return path.name[1:].split(".")[0] if path.name.endswith(f".partial{path.suffix}") else path.stem


def execute(steps: Sequence[Step], say: Callable[[str], None] = print, graph: Sequence[Step] = ()) -> list[str]:
    """Run the out-of-date steps in order (the order is the graph's: a step comes after the steps
    that make its inputs); returns one line per step left pending, naming the step of ``graph`` (the
    whole graph, of which ``steps`` may be a selection) that makes what it waits for. Raises
    :class:`StepFailed`."""
    makers = {path: step for step in (*graph, *steps) if not callable(step.outputs) for path in step.outputs}
    pending = []
    for step in steps:
        try:
            inputs = step.resolved_inputs()
            outputs = step.resolved_outputs()
        except Pending as reason:
            pending.append(f"{step.name}: {reason}")
            continue
        except NotNeeded as reason:
            say(f"[{step.name}] not needed: {reason}")
            continue
        missing = [path for path in inputs if not path.exists()]
        if missing:
            made_by = ", ".join(
                f"{path}" + (f" (step {makers[path].name}, --steps {makers[path].phase})" if path in makers else "")
                for path in missing
            )
            pending.append(f"{step.name}: waiting for {made_by}")
            continue
        if step.up_to_date(inputs, outputs):
            continue
        say(f"[{step.name}] running")
        started = time.perf_counter()
        _run(step, outputs)
        say(f"[{step.name}] done in {time.perf_counter() - started:.1f} s")
    return pending


def _run(step: Step, outputs: Sequence[Path]) -> None:
    if step.in_place:
        step.action(outputs)
    else:
        partial = [scratch(path) for path in outputs]
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            step.action(partial)
            absent = [str(path) for path in partial if not path.exists()]
            if absent:
                raise StepFailed(f"step {step.name} did not write {', '.join(absent)}")
            for source, target in zip(partial, outputs, strict=True):
                os.replace(source, target)
        finally:
            for path in partial:  # a failed or interrupted step leaves no scratch file behind
                path.unlink(missing_ok=True)
    absent = [str(path) for path in outputs if not path.exists()]
    if absent:
        raise StepFailed(f"step {step.name} did not make {', '.join(absent)}")


def selecsls_command(args: Sequence[str], log: Path) -> None:
    """Run one ``selecsls`` command in this process (``selecsls.cli.main``: the command line's own
    entry point, without a new interpreter per step), its output appended to ``log``."""
    from selecsls.cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    line = "$ selecsls " + " ".join(args)
    print(line, flush=True)
    with open(log, "a") as handle:
        handle.write(f"\n{line}\n")
        handle.flush()
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            status = main(list(args))
    if status:
        raise StepFailed(f"failed ({status}): {line}; see {log}")


def report_pending(pending: Sequence[str]) -> int:
    """Print the pending steps; the exit status of the study command (0 when nothing waits)."""
    for line in pending:
        print(f"pending: {line}", file=sys.stderr)
    return EXIT_PENDING if pending else 0
