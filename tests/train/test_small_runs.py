"""A new user's first small runs: fine-tuning defaults, the warm-up of a short run, what the log shows,
and what a finished run folder holds (issue 27, items 7, 10 and 11)."""

import dataclasses
import json

import pytest
import torch

import selecsls
from selecsls.cli import build_parser, main
from selecsls.compress.sparsity import bn_scales
from selecsls.train.config import DEFAULT_IMG_SIZE, TrainConfig
from selecsls.train.optimization import MAX_DEFAULT_WARMUP_FRACTION, Optimization
from selecsls.train.ownership import LOCK_NAME, RUN_OUTPUTS
from selecsls.train.reporting import Reporter, epoch_line
from training_fixtures import make_image_folder, narrow_spec


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def init_32px(tmp_path_factory):
    """A narrow model that records 32x32 px as its input size, as one trained at 32 px does."""
    model = selecsls.create_model(narrow_spec(), num_classes=3)
    model.card = model.card.with_image_size(32, 32)
    path = tmp_path_factory.mktemp("init") / "narrow32.pt"
    selecsls.save(model, path)
    return path


@pytest.fixture(scope="module")
def one_epoch_run(folder, init_32px, tmp_path_factory):
    """``selecsls train --init FILE --epochs 1`` without --img-size: a new user's first fine-tune."""
    output = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--data", str(folder), "--init", str(init_32px), "--output", str(output)]
    return output, main([*argv, "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress"])


def test_init_trains_at_the_size_the_file_records(one_epoch_run):
    output, status = one_epoch_run
    assert status == 0
    assert selecsls.load(output / "best.pt").card.preprocessing.input_size == (3, 32, 32)
    assert json.loads((output / "summary.json").read_text())["final"]["epoch"] == 1


def test_img_size_has_help_and_a_default_named_in_it():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    action = next(a for a in train_parser._actions if a.dest == "img_size")
    assert action.help and str(DEFAULT_IMG_SIZE) in action.help and "--init" in action.help


def test_training_img_size_prefers_the_option_then_the_file_then_the_default():
    config = TrainConfig("d", "o")
    assert config.training_img_size(None) == DEFAULT_IMG_SIZE and config.training_img_size(32) == 32
    assert dataclasses.replace(config, img_size=64).training_img_size(32) == 64
    # A run saved before --img-size defaulted to None resumes: without --init its size is the default.
    assert config.run_settings()["img_size"] == DEFAULT_IMG_SIZE


def test_the_recipe_warm_up_takes_a_small_part_of_a_short_run():
    model = torch.nn.Linear(4, 2)
    optimization = Optimization(model, TrainConfig("d", "o", epochs=1), 20, lambda m: m)
    schedule = optimization.scheduler.lr_lambdas[0]
    assert schedule.warmup_steps == int(MAX_DEFAULT_WARMUP_FRACTION * 20) == 2
    assert "warm-up 2 of 20 steps" in optimization.schedule_note and "--warmup-epochs" in optimization.schedule_note
    # A warm-up asked for is kept (validated to at most half the run).
    asked = Optimization(model, TrainConfig("d", "o", epochs=2, warmup_epochs=1.0), 20, lambda m: m)
    assert asked.scheduler.lr_lambdas[0].warmup_steps == 20


def test_a_ten_epoch_run_keeps_its_one_epoch_warm_up():
    optimization = Optimization(torch.nn.Linear(4, 2), TrainConfig("d", "o", epochs=10), 50, lambda m: m)
    assert optimization.scheduler.lr_lambdas[0].warmup_steps == 50


def test_the_epoch_line_leads_with_what_a_person_reads(one_epoch_run):
    output, _ = one_epoch_run
    record = json.loads((output / "metrics.jsonl").read_text().splitlines()[0])
    line = epoch_line(record, 1)
    assert line.startswith(f"epoch 1/1  train loss {record['train_loss']:.4f}  val loss {record['val_loss']:.4f}  ")
    assert f"top-1 {record['val_top1']:.2f}%" in line and "{" not in line
    assert record["epoch_seconds"] > 0


def test_a_run_logs_its_size_warm_up_and_epoch_lines(folder, init_32px, tmp_path, capsys):
    argv = ["train", "--data", str(folder), "--init", str(init_32px), "--output", str(tmp_path / "run")]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress", "--limit", "6"]) == 0
    out = capsys.readouterr().out
    assert f"training at 32x32 px (the size {init_32px} records; --img-size to change)" in out
    assert "learning rate: warm-up 0 of 1 steps" in out
    lines = out.splitlines()
    assert any(line.startswith("epoch 1/1  train loss ") for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines), "the JSON record stays in metrics.jsonl"


def test_a_finished_run_folder_holds_only_its_results(one_epoch_run):
    output, _ = one_epoch_run
    assert not (output / LOCK_NAME).exists()
    assert {path.name for path in output.iterdir()} == set(RUN_OUTPUTS)


def test_a_run_that_stops_leaves_no_lock_file(folder, init_32px, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "keep.txt").write_text("a user's file")
    argv = ["train", "--data", str(folder), "--init", str(init_32px), "--output", str(output), "--workers", "0"]
    assert main([*argv, "--batch-size", "100", "--no-progress"]) == 2  # no full batch: stops before training
    assert {path.name for path in output.iterdir()} == {"keep.txt"}


def test_the_sparsity_table_shows_only_when_something_is_sparse(capsys):
    model = selecsls.create_model(narrow_spec(), num_classes=3)
    reporter = Reporter(None, True, False)
    assert reporter.sparsity(model) == 0.0
    out = capsys.readouterr().out
    assert "features.5.conv6" not in out and "0/" in out and "pruning candidates" in out
    with torch.no_grad():
        model.features[1].conv2.bn.weight[:3] = 0.0
    assert reporter.sparsity(model) == pytest.approx(3 / bn_scales(model).numel())
    out = capsys.readouterr().out
    assert "features.1.conv2" in out and "3/" in out
