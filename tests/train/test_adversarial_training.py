"""Training misused: divergence, unreadable data, two runs in one directory, earlier results, stale
temporary files, resuming from elsewhere. Nothing lost, nothing silently wrong."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.models.layouts import non_finite
from selecsls.train.loop import Run, TrainConfig, TrainingInterrupted, train
from selecsls.train.ownership import LOCK_NAME, REPLACED_NAME, RUN_OUTPUTS
from training_fixtures import corrupt_image, make_image_folder, narrow_spec

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "narrow.pt"
    selecsls.save(selecsls.create_model(narrow_spec(), num_classes=3), path)
    return path


def _args(folder, init, output, *extra):
    common = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--epochs", "1"]
    return ["train", "--data", str(folder), "--init", str(init), "--output", str(output), *common, *map(str, extra)]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selecsls train: error:"), err
    return err


def _finite_or_absent(output):
    for name in ("best.pt", "last.pt"):
        if (output / name).exists():
            state = torch.load(output / name, weights_only=True)["state_dict"]
            assert not non_finite(state), f"{name} holds non-finite weights"


@pytest.mark.parametrize("extra", [["--lr", "1e9"], ["--lr", "1e30", "--recipe", "sgd"]])
def test_divergence_stops_with_an_error_and_saves_no_nan(folder, init, tmp_path, capsys, extra):
    err = _error(capsys, _args(folder, init, tmp_path / "run", "--epochs", 2, *extra))
    assert "training diverged" in err
    _finite_or_absent(tmp_path / "run")


def test_a_training_set_of_unreadable_images_is_refused(tmp_path, init, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    for image in (data / "train").rglob("*.*"):
        corrupt_image(image)
    err = _error(capsys, _args(data, init, tmp_path / "run"))
    assert "could not read 12 of 12 training images" in err and "nothing was saved" in err
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_second_run_into_the_same_directory_refuses_and_the_first_finishes_intact(folder, init, tmp_path, capsys):
    output = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "selecsls", *_args(folder, init, output, "--epochs", 3)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=SUBPROCESS_ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in ((output / LOCK_NAME).read_text() if (output / LOCK_NAME).exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.1)
        err = _error(capsys, _args(folder, init, output, "--epochs", 3, "--overwrite"))
        assert f"another training run is using {output}" in err and f'"pid": {first.pid}' in err
        resumed = _error(capsys, _args(folder, init, output, "--epochs", 3, "--resume"))
        assert "another training run is using" in resumed
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    history = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert selecsls.load(output / "best.pt").num_classes == 3
    assert torch.load(output / "last.pt", weights_only=True)["position"]["epoch"] == 3


def test_a_lock_left_by_a_dead_run_is_taken_over(folder, init, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / LOCK_NAME).write_text(json.dumps({"pid": 999_999_999, "host": "gone"}))
    assert main(_args(folder, init, output)) == 0
    written = {path.name for path in output.iterdir()}  # the run took the dead run's lock and deleted it at the end
    assert written == set(RUN_OUTPUTS), "RUN_OUTPUTS must list every file a run writes"


def test_earlier_results_need_resume_or_overwrite(folder, init, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "best.pt").write_bytes(b"an earlier run's best model")
    (output / "metrics.jsonl").write_text('{"epoch": 7}\n')
    err = _error(capsys, _args(folder, init, output))
    assert "holds an earlier run's results (best.pt, metrics.jsonl)" in err and "--overwrite" in err
    assert (output / "best.pt").read_bytes() == b"an earlier run's best model"
    assert main(_args(folder, init, output, "--overwrite")) == 0
    assert [json.loads(line)["epoch"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1]
    assert selecsls.load(output / "best.pt").num_classes == 3


def test_cleanup_removes_only_stale_temporary_files_of_the_run(folder, init, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    dead = output / ".last.pt.999999999.abc.tmp"
    live = output / f".best.pt.{os.getppid()}.abc.tmp"  # a live process's save in progress
    foreign = output / ".notes.txt.999999999.abc.tmp"  # not one of the run's outputs
    for path in (dead, live, foreign):
        path.write_bytes(b"partial")
    assert main(_args(folder, init, output)) == 0
    assert not dead.exists() and live.exists() and foreign.exists()


def test_resume_accepts_the_same_data_spelled_another_way(folder, init, tmp_path, monkeypatch):
    output = tmp_path / "run"
    monkeypatch.chdir(folder.parent)
    assert main(_args(os.path.relpath(folder), init, output)) == 0
    monkeypatch.chdir(tmp_path)
    assert main(_args(folder, init, output, "--epochs", 2, "--resume")) == 2  # epochs differ: still compared
    assert main(_args(folder.resolve(), init, output, "--resume")) == 0


def test_a_class_added_since_the_run_is_refused_before_training(tmp_path, init, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    assert main(_args(data, init, tmp_path / "run", "--epochs", 2)) == 0
    for split in ("train", "val"):
        (data / split / "owl").mkdir()
        (data / split / "owl" / "0.jpg").write_bytes((data / split / "cat" / "0.jpg").read_bytes())
    err = _error(capsys, _args(data, init, tmp_path / "run", "--epochs", 2, "--resume"))
    assert "the saved run predicts 3 classes but --data now has 4" in err


def test_an_output_that_cannot_be_written_fails_before_training(folder, init, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file" in _error(capsys, _args(folder, init, blocker / "run"))
    assert "is the input" in _error(capsys, _args(folder, init, folder))


# ------------------------------------------------------------------------ issue 19: overwrite, Ctrl-C
def _earlier_run(output):
    """An output directory holding an earlier run's results (their bytes, to check that they survive)."""
    output.mkdir()
    earlier = {"last.pt": b"earlier last", "best.pt": b"earlier best", "metrics.jsonl": b'{"epoch": 7}\n'}
    for name, data in earlier.items():
        (output / name).write_bytes(data)
    return earlier


def _holds(output, files):
    assert {name: (output / name).read_bytes() for name in files} == files
    assert not (output / REPLACED_NAME).exists()


@pytest.mark.parametrize(
    "mistake, message",
    [
        (["--data", "TYPO"], "data directory 'TYPO' does not exist"),
        (["--model", "selecsls42c"], "--model 'selecsls42c' is not a model selecsls builds"),
        (["--init", "{output}/missing.pt"], "missing.pt does not exist"),
        (["--lr", "1e9"], "training diverged"),  # fails in the first epoch, before the run's first save
    ],
)
def test_a_failing_overwrite_keeps_the_earlier_results(folder, init, tmp_path, capsys, mistake, message):
    output = tmp_path / "run"
    earlier = _earlier_run(output)
    mistake = [part.replace("{output}", str(output)) for part in mistake]
    err = _error(capsys, [*_args(folder, init, output), "--overwrite", *mistake])
    assert message in err
    _holds(output, earlier)


def test_overwrite_can_fine_tune_from_the_run_it_replaces(folder, init, tmp_path, capsys):
    output = tmp_path / "run"
    _earlier_run(output)
    (output / "best.pt").write_bytes(init.read_bytes())  # read before anything in the directory is touched
    assert main(_args(folder, init, output, "--init", output / "best.pt", "--overwrite")) == 0
    assert "moved the earlier run's results (last.pt, best.pt, metrics.jsonl) aside" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1]
    assert {path.name for path in output.iterdir()} == set(RUN_OUTPUTS)


def test_a_run_killed_while_earlier_results_were_aside_is_settled_by_the_next(folder, init, tmp_path, capsys):
    output = tmp_path / "run"
    earlier = _earlier_run(output)
    (output / REPLACED_NAME).mkdir()
    for name in earlier:  # as a killed --overwrite run leaves them, having saved nothing of its own
        (output / name).rename(output / REPLACED_NAME / name)
    (output / "best.pt").write_bytes(b"the killed run's first best.pt")
    assert "holds an earlier run's results (last.pt, best.pt, metrics.jsonl)" in _error(
        capsys, _args(folder, init, output)
    )
    _holds(output, earlier)


def test_ctrl_c_is_one_line_saying_how_to_resume_and_resume_works(folder, init, tmp_path, capsys, monkeypatch):
    output, save_last = tmp_path / "run", Run._save_last

    def save_then_ctrl_c(run):
        save_last(run)
        signal.raise_signal(signal.SIGINT)  # a real SIGINT, as a terminal sends it, right after a save

    monkeypatch.setattr(Run, "_save_last", save_then_ctrl_c)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(_args(folder, init, output, "--epochs", 1000))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a KeyboardInterrupt traceback")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130 and capsys.readouterr().err.strip() == (
        f"selecsls train: interrupted: continue from the last save, {output / 'last.pt'}, with the same command "
        "and --resume"
    )
    monkeypatch.undo()
    epoch = torch.load(output / "last.pt", weights_only=True)["position"]["epoch"]
    assert main(_args(folder, init, output, "--epochs", 1000, "--resume", "--stop-after", epoch + 1)) == 0
    assert torch.load(output / "last.pt", weights_only=True)["position"]["epoch"] == epoch + 1


def test_ctrl_c_before_the_first_save_of_an_overwrite_puts_the_earlier_results_back(
    folder, init, tmp_path, monkeypatch
):
    output = tmp_path / "run"
    earlier = _earlier_run(output)

    def interrupted(run):
        assert (output / REPLACED_NAME).is_dir(), "set aside only once the run is ready to train"
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "fit", interrupted)
    config = TrainConfig(str(folder), str(output), init=str(init), img_size=32, batch_size=4, workers=0, progress=False)
    config.overwrite = True
    with pytest.raises(TrainingInterrupted, match="nothing of this run was saved; .* holds the earlier run's results"):
        train(config)
    _holds(output, earlier)


def test_an_output_inside_the_data_folder_is_refused_as_such(folder, init, capsys):
    err = _error(capsys, _args(folder, init, folder / "train" / "run"))
    assert f"--output {folder / 'train' / 'run'} is inside the data folder {folder.resolve() / 'train'}" in err
    assert not (folder / "train" / "run").exists()


def test_in_chans_that_the_init_file_does_not_have_is_refused(folder, init, tmp_path, capsys):
    err = _error(capsys, _args(folder, init, tmp_path / "run", "--in-chans", 1))
    assert f"--in-chans 1 does not apply with --init: the model reads the 3 input channel(s) of {init}" in err


def test_the_divergence_message_says_what_the_output_directory_holds(folder, init, tmp_path, capsys):
    # It said "last.pt and best.pt keep the last finite state" when nothing had been saved.
    err = _error(capsys, _args(folder, init, tmp_path / "run", "--epochs", 2, "--lr", "1e9"))
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "last.pt and best.pt keep" not in err and "nothing was saved" in err and "--lr" in err
    output = tmp_path / "earlier"
    _earlier_run(output)
    err = _error(capsys, [*_args(folder, init, output), "--overwrite", "--lr", "1e9"])
    assert f"nothing of this run was saved; {output} holds the earlier run's results as before" in err
