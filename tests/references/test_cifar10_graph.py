"""The study's runner: out-of-date steps only, outputs whole or not at all, pending steps named."""

import os
from pathlib import Path

import pytest
from graph import EXIT_PENDING, NotNeeded, Pending, Step, StepFailed, execute, report_pending, scratch


def _writer(text: str, calls: list):
    def write(paths):
        calls.append([path.name for path in paths])
        for path in paths:
            path.write_text(text)

    return write


def test_a_step_runs_once_and_again_only_when_an_input_is_newer(tmp_path):
    source, target, calls = tmp_path / "in.txt", tmp_path / "out" / "made.txt", []
    source.write_text("x")
    step = Step("make", "p", (target,), _writer("made", calls), (source,))
    assert execute([step]) == []
    assert target.read_text() == "made" and calls == [[scratch(target).name]]
    assert execute([step]) == [] and len(calls) == 1  # up to date
    os.utime(source, (target.stat().st_mtime + 10,) * 2)
    execute([step])
    assert len(calls) == 2


def test_a_failing_step_leaves_no_output_and_keeps_the_previous_one(tmp_path):
    target = tmp_path / "made.txt"
    target.write_text("previous")
    os.utime(target, (0, 0))
    source = tmp_path / "in.txt"
    source.write_text("x")

    def half_written(paths):
        paths[0].write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        execute([Step("make", "p", (target,), half_written, (source,))])
    assert target.read_text() == "previous"
    with pytest.raises(StepFailed, match="did not write"):
        execute([Step("make", "p", (target,), lambda paths: None, (source,))])


def test_missing_inputs_and_pending_choices_are_reported_with_their_maker(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"

    def blocked():
        raise Pending("the pilot group has not chosen")

    def unneeded():
        raise NotNeeded("not chosen")

    steps = [
        Step("a", "p", (first,), lambda paths: (_ for _ in ()).throw(Pending("unused")), blocked),
        Step("b", "p", (second,), _writer("b", []), (first,)),
        Step("c", "p", (tmp_path / "c.txt",), _writer("c", []), unneeded),
    ]
    pending = execute(steps, say=lambda line: None)
    assert pending == ["a: the pilot group has not chosen", f"b: waiting for {first} (step a, --steps p)"]
    assert not (tmp_path / "c.txt").exists()
    assert report_pending(pending) == EXIT_PENDING and report_pending([]) == 0


def test_a_done_test_replaces_the_file_dates_and_in_place_steps_write_their_outputs(tmp_path):
    target, calls = tmp_path / "run" / "summary.json", []

    def train(paths):
        calls.append(paths)
        paths[0].parent.mkdir(parents=True)
        paths[0].write_text("{}")

    step = Step("train", "p", (target,), train, in_place=True, done=target.exists)
    execute([step])
    execute([step])
    assert calls == [(target,)]
    assert not list(Path(tmp_path).rglob("*.partial*"))
