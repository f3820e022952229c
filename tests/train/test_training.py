import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import selecsls
from selecsls.cli import main
from selecsls.compress.sparsity import bn_scales
from selecsls.train.distributed import Workers
from selecsls.train.loop import Run, TrainConfig, train
from training_fixtures import SUBPROCESS_ENV, corrupt_image, make_image_folder, narrow_spec, write_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("data"), per_class=8)
    corrupt_image(root / "train" / "cat" / "3.png")
    return root


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A narrow model with 5 classes: fine-tuning it on the 3-class folder re-initialises the classifier."""
    path = tmp_path_factory.mktemp("init") / "narrow5.pt"
    selecsls.save(selecsls.create_model(narrow_spec(), num_classes=5), path)
    return path


def _tiny_args(folder, init, output, *extra):
    return [
        "train",
        "--data",
        str(folder),
        "--init",
        str(init),
        "--output",
        str(output),
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
        *map(str, extra),
    ]


@pytest.fixture(scope="module")
def tiny_run(folder, init_checkpoint, tmp_path_factory):
    """A 2-epoch fine-tuning run on the tiny folder (one corrupt training image), with EMA."""
    output = tmp_path_factory.mktemp("run")
    capture = subprocess.run(
        [
            sys.executable,
            "-m",
            "selecsls",
            *_tiny_args(folder, init_checkpoint, output, "--epochs", 2, "--ema-decay", 0.9),
        ],
        capture_output=True,
        text=True,
        env=SUBPROCESS_ENV,
        timeout=120,
    )
    assert capture.returncode == 0, capture.stderr
    return output, capture


def test_fine_tuning_reinitialises_the_classifier_and_writes_every_output(tiny_run):
    output, capture = tiny_run
    assert "checkpoint has 5 classifier outputs, the model 3" in capture.stderr
    outputs = {"last.pt", "best.pt", "metrics.jsonl", "training_curve.png", "gamma_histograms.png"}
    assert outputs <= {p.name for p in output.iterdir()}
    assert not [p for p in output.iterdir() if p.name.endswith(".tmp")]
    history = _history(output)
    assert [r["epoch"] for r in history] == [1, 2] and "ema_val_top1" in history[0]
    best = selecsls.load(output / "best.pt")
    assert best.num_classes == 3 and best.spec == narrow_spec()
    for plot in ("training_curve.png", "gamma_histograms.png"):
        assert (output / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((output / "summary.json").read_text())
    assert "have fused filter norm < 0.001" in capture.stdout  # the summary; its table only when something is sparse
    assert ("features.5.conv6" in capture.stdout) == (summary["low_gamma_fraction"] > 0)
    assert 0.0 <= summary["low_gamma_fraction"] <= 1.0 and summary["best_top1"] == max(
        r["ema_val_top1"] for r in history
    )


def test_metrics_record_the_bn_scale_sparsity_of_every_epoch(tiny_run):
    output, capture = tiny_run
    channels = bn_scales(selecsls.load(output / "last.pt")).numel()
    for record in _history(output):
        assert 0.0 <= record["gamma_below_1e-3"] <= record["gamma_below_1e-2"] <= 1.0
        assert 0.0 <= record["gamma_min"] <= record["gamma_median"]
        assert sum(record["gamma_histogram"]["counts"]) == channels
    final = _history(output)[-1]
    assert final["gamma_median"] == pytest.approx(bn_scales(selecsls.load(output / "last.pt")).median().item())
    assert "gamma_histogram" not in capture.stdout  # the log line stays short


def test_corrupt_training_image_is_skipped_and_reported_once_per_epoch(tiny_run):
    output, capture = tiny_run
    assert [r["train_skipped"] for r in _history(output)] == [1, 1]
    assert capture.stdout.count("skipped 1 unreadable training image(s)") == 2


def test_training_checkpoint_holds_the_full_state(tiny_run):
    state = _last(tiny_run[0])
    assert {"optimizer", "scheduler", "ema", "rng", "position", "history", "config"} <= set(state)
    assert state["position"]["epoch"] == 2 and state["position"]["global_step"] == 2 * (24 // 4)
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_eval_of_best_checkpoint_reproduces_the_recorded_val_accuracy(tiny_run, folder, capsys):
    output, _ = tiny_run
    assert (
        main(["eval", "--data", str(folder), "--checkpoint", str(output / "best.pt"), "--workers", "0", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    best = max(_history(output), key=lambda r: r["ema_val_top1"])
    assert result["img_size"] == 32  # the training size, recorded in the model
    assert result["top1"] == pytest.approx(best["ema_val_top1"])


def _predicted_names(capsys, argv) -> set[str]:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[1] for line in lines if line.lstrip()[:2] in ("1.", "2.", "3.")}


def test_class_names_survive_checkpoints_save_load_predict_eval_and_onnx(tiny_run, folder, tmp_path, capsys):
    output, capture = tiny_run
    names = ("cat", "dog", "fox")
    assert f"validating on 24 of 24 in {folder / 'val'}" in capture.stdout
    for checkpoint in ("best.pt", "last.pt"):
        assert selecsls.load(output / checkpoint).pretrained_cfg["label_names"] == names
    saved = tmp_path / "saved.safetensors"
    selecsls.save(selecsls.load(output / "best.pt"), saved)
    assert selecsls.load(saved).pretrained_cfg["label_names"] == names
    image = str(folder / "val" / "dog" / "0.jpg")
    assert _predicted_names(capsys, ["predict", image, "--checkpoint", str(saved), "--backend", "eager"]) == set(names)
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(output / "best.pt"), "--format", "onnx", "--out", str(onnx)]) == 0
    capsys.readouterr()
    assert _predicted_names(capsys, ["predict", image, "--checkpoint", str(onnx)]) == set(names)
    assert main(["eval", "--data", str(folder), "--checkpoint", str(saved), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classes"] == list(names) and result["classes_matched_by"] == "name"


def test_training_takes_a_test_split_and_class_balanced_limits(init_checkpoint, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4, splits=("train", "test"))
    config = TrainConfig(
        data=str(data),
        output=str(tmp_path / "run"),
        init=str(init_checkpoint),
        img_size=32,
        epochs=1,
        batch_size=2,
        limit=6,
        val_limit=3,
        workers=0,
        progress=False,
    )
    run = Run(config, Workers(0, 1, torch.device("cpu")))
    assert sorted(run.train_data.targets[i] for i in run.train_indices) == [0, 0, 1, 1, 2, 2]
    assert sorted(run.val_data.targets[i] for i in run.val_indices) == [0, 1, 2]
    assert f"training on 6 of 12 images in {data / 'train'}, validating on 3 of 12 in {data / 'test'}" in (
        capsys.readouterr().out
    )
    run.fit()
    [record] = _history(tmp_path / "run")
    assert record["val_images"] == 3 and record["step"] == 3


@pytest.mark.parametrize("data_path", ["files", "tensor cache"])
def test_kill_and_resume_ends_with_the_same_weights(folder, init_checkpoint, tmp_path, data_path):
    cache = ["--data-cache", "{out}.cache"] if data_path == "tensor cache" else []
    args = _tiny_args(folder, init_checkpoint, "{out}", "--epochs", 2, "--save-every", 1, *cache)
    command = [sys.executable, "-m", "selecsls", *args]

    def run(output, *extra):
        cmd = [a.replace("{out}", str(output)) for a in command] + list(extra)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)

    def finish(process):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        return out

    reference = run(tmp_path / "whole")
    interrupted = run(tmp_path / "cut")
    last = tmp_path / "cut" / "last.pt"
    saves, seen = 0, None
    while saves < 3 and interrupted.poll() is None:  # let a few saves land, then kill -9 mid-run
        stamp = last.stat().st_mtime_ns if last.exists() else None
        saves, seen = saves + (stamp is not None and stamp != seen), stamp
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    assert interrupted.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    cut_at = _last(tmp_path / "cut")["position"]["global_step"]
    assert 0 < cut_at < 2 * 6
    assert "resumed from" in finish(run(tmp_path / "cut", "--resume"))
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # a save cut short leaves nothing behind
    finish(reference)

    whole, cut = _last(tmp_path / "whole"), _last(tmp_path / "cut")
    assert cut["position"] == whole["position"]
    assert cut["state_dict"].keys() == whole["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(cut["state_dict"][key], value), key
    assert [r["train_loss"] for r in _history(tmp_path / "cut")] == [
        r["train_loss"] for r in _history(tmp_path / "whole")
    ]


def test_two_process_ddp_run(folder, init_checkpoint, tmp_path):
    # Also exercises bf16 autocast, channels_last, gradient clipping and colour jitter. At 64 px: with two
    # processes, bf16 and the head on 1x1 maps (32 px) the loss turns NaN on this CPU's oneDNN, which
    # the non-finite guard (rightly) reports as divergence; see docs/training.md.
    options = ["--epochs", 1, "--amp", "bf16", "--channels-last", "--clip-grad", 1.0, "--color-jitter", 0.2]
    options += ["--img-size", 64]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "selecsls",
        *_tiny_args(folder, init_checkpoint, tmp_path, *options),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best val top-1") == 1  # only rank 0 reports
    state = _last(tmp_path)
    # 24 training images over 2 processes in batches of 4: 3 steps; validation is sharded, not padded.
    assert state["position"]["global_step"] == 24 // 2 // 4
    [record] = _history(tmp_path)
    assert record["val_images"] == 24 and record["train_skipped"] in (0, 1)


def test_fine_tuning_a_pruned_model_keeps_its_spec_and_reports_sparsity(folder, tmp_path, capsys):
    # The second step of the prune -> fine-tune flow: the pruned model is fused (no BatchNorm).
    dense = selecsls.create_model(narrow_spec(), num_classes=3).eval()
    with torch.no_grad():
        dense.features[1].conv2.bn.weight[:3] = 0.0
    pruned = selecsls.prune(dense)
    selecsls.save(pruned, tmp_path / "pruned.pt")
    argv = _tiny_args(folder, tmp_path / "pruned.pt", tmp_path / "run", "--epochs", 1)
    assert main(argv) == 0
    assert "have fused filter norm < 0.001" in capsys.readouterr().out
    [record] = _history(tmp_path / "run")
    assert "gamma_min" not in record and not (tmp_path / "run" / "gamma_histograms.png").exists()  # no BN left
    assert (tmp_path / "run" / "training_curve.png").exists()
    tuned = selecsls.load(tmp_path / "run" / "best.pt")
    assert tuned.fused and tuned.spec == pruned.spec


@pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST IDX files not installed in {FASHION_MNIST} (CI installs them)",
)
def test_fashion_mnist_smoke_training_learns(tmp_path):
    # selecsls42b's topology at a quarter of its widths: ~2 M parameters, a few seconds per epoch.
    init = tmp_path / "narrow42b.pt"
    selecsls.save(selecsls.create_model(narrow_spec(4), num_classes=10), init)
    args = [
        "train",
        "--data",
        str(FASHION_MNIST),
        "--init",
        str(init),
        "--output",
        str(tmp_path / "run"),
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--limit",
        "2048",
        "--val-limit",
        "500",
        "--lr",
        "5e-3",
        "--warmup-epochs",
        "0.1",
        "--smoothing",
        "0",
        "--min-crop-area",
        "1",
        "--workers",
        "0",
        "--no-progress",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "selecsls", *args], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    final = _history(tmp_path / "run")[-1]
    assert final["val_images"] == 500
    assert final["val_top1"] > 40.0  # chance is 10%


# ------------------------------------------------------------------------ errors
def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selecsls train: error:")
    return err


def test_existing_run_needs_resume(tiny_run, folder, init_checkpoint, capsys):
    err = _error(capsys, _tiny_args(folder, init_checkpoint, tiny_run[0], "--epochs", 2))
    assert "holds an earlier run's results (last.pt, best.pt" in err and "pass --resume" in err


def test_resume_with_other_settings_names_them(tiny_run, folder, init_checkpoint, capsys):
    err = _error(
        capsys, _tiny_args(folder, init_checkpoint, tiny_run[0], "--epochs", 3, "--ema-decay", 0.9, "--resume")
    )
    assert "these differ: epochs (saved 2, given 3)" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit", "3"], "3 training images give no full batch of 4 per process"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
        (["--save-every", "-1"], "--save-every must be >= 0"),
        (["--clip-grad", "0"], "--clip-grad must be > 0"),
        (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
        (["--smoothing", "1"], "--smoothing must be in [0, 1)"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--img-size", "0"], "--img-size must be >= 16, got 0"),
        (["--img-size", "100000"], "--img-size 100000 at batch 4 needs about"),
        (["--warmup-epochs", "-3"], "--warmup-epochs must be >= 0, got -3"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "0"], "--lr must be > 0, got 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
        (["--min-crop-area", "0"], "--min-crop-area must be in (0, 1]"),
        (["--resume", "--overwrite"], "--resume continues the run in --output, --overwrite replaces it"),
        (["--init", "missing.pt"], "checkpoint missing.pt does not exist"),
    ],
)
def test_bad_settings_are_one_clear_error(folder, init_checkpoint, tmp_path, capsys, extra, message):
    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    assert message in _error(capsys, _tiny_args(folder, init_checkpoint, tmp_path / "out", *extra))


def test_data_problems_stop_before_training(tmp_path, init_checkpoint, capsys):
    data = make_image_folder(tmp_path / "data", per_class=1)
    (data / "val" / "wolf").mkdir()
    (data / "val" / "wolf" / "0.jpg").write_bytes((data / "val" / "cat" / "0.jpg").read_bytes())
    err = _error(capsys, _tiny_args(data, init_checkpoint, tmp_path / "out"))
    assert "['wolf'] that are not training classes" in err
    (data / "train" / "owl").mkdir()
    assert "holds no images" in _error(capsys, _tiny_args(data, init_checkpoint, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_baseline_with_other_input_channels_is_one_clear_error(folder, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        str(folder),
        "--output",
        str(tmp_path),
        "--model",
        "resnet50",
        "--in-chans",
        "1",
        "--batch-size",
        "4",
    ]
    assert "baseline resnet50 takes 3 input channels; drop --in-chans 1" in _error(capsys, argv)


def test_unknown_model_name_is_one_clear_error(folder, tmp_path, capsys):
    argv = ["train", "--data", str(folder), "--output", str(tmp_path), "--model", "selecsls999", "--batch-size", "4"]
    err = _error(capsys, argv)
    assert "--model 'selecsls999' is not a model selecsls builds; choose one of selecsls102" in err
    assert "resnet50" in err


def test_a_trained_baseline_carries_its_class_names_to_eval_and_predict(folder, tmp_path, capsys):
    output = tmp_path / "resnet50"
    config = TrainConfig(
        data=str(folder), output=str(output), model="resnet50", img_size=32, epochs=1, batch_size=8, workers=0
    )
    train(dataclasses.replace(config, progress=False))
    model = selecsls.load(output / "best.pt")
    assert model.pretrained_cfg["label_names"] == ("cat", "dog", "fox")
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    capsys.readouterr()
    assert (
        main(["eval", "--data", str(folder), "--checkpoint", str(output / "best.pt"), "--workers", "0", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["classes_matched_by"] == "name"
    image = str(folder / "val" / "dog" / "0.jpg")
    assert _predicted_names(
        capsys, ["predict", image, "--checkpoint", str(output / "best.pt"), "--backend", "eager"]
    ) <= {
        "cat",
        "dog",
        "fox",
    }


def test_a_cached_run_validates_exactly_as_eval_on_the_image_files(folder, init_checkpoint, tmp_path, capsys):
    # Cached training (batched augmentation) scores its epochs on the cached val split; eval decodes
    # the files: the same pixels, so the same top-1 and loss.
    output, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_tiny_args(folder, init_checkpoint, output, "--epochs", 1, "--data-cache", cache)) == 0
    assert "building the train tensor cache" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "train-32px-bilinear-rgb.json",
        "train-32px-bilinear-rgb.npy",
        "val-32px-crop0.875-bilinear-rgb.json",
        "val-32px-crop0.875-bilinear-rgb.npy",
    ]
    [record] = _history(output)
    assert record["train_skipped"] == 1  # the corrupt training image, reported as on the file path
    argv = ["eval", "--data", str(folder), "--checkpoint", str(output / "best.pt"), "--workers", "0", "--json"]
    assert main(argv) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["top1"] == record["val_top1"] and scored["loss"] == pytest.approx(record["val_loss"], rel=1e-5)


def test_a_stale_cache_stops_training_before_it_starts(tmp_path, init_checkpoint, capsys):
    data, cache = make_image_folder(tmp_path / "data", per_class=2), tmp_path / "cache"
    assert main(_tiny_args(data, init_checkpoint, tmp_path / "a", "--data-cache", cache, "--batch-size", 2)) == 0
    (data / "train" / "cat" / "0.jpg").unlink()
    err = _error(capsys, _tiny_args(data, init_checkpoint, tmp_path / "b", "--data-cache", cache, "--batch-size", 2))
    assert "--data-cache: tensor cache" in err and "holds another number of images" in err and "to rebuild it" in err
    assert not (tmp_path / "b" / "last.pt").exists()


def test_a_cache_in_the_image_tree_or_of_idx_files_is_one_clear_error(folder, init_checkpoint, tmp_path, capsys):
    inside = folder / "train" / "cache"
    err = _error(capsys, _tiny_args(folder, init_checkpoint, tmp_path / "a", "--data-cache", inside))
    assert "is inside the data folder" in err and "put it outside --data" in err
    assert not inside.exists()
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, count in (("train", 8), ("t10k", 4)):
        write_idx(idx / f"{prefix}-images-idx3-ubyte", np.zeros((count, 16, 16), np.uint8))
        write_idx(idx / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 2)
    err = _error(capsys, _tiny_args(idx, init_checkpoint, tmp_path / "b", "--data-cache", tmp_path / "c"))
    assert "--data-cache caches class folders of images; IDX files are already decoded" in err


def test_a_run_in_parts_ends_as_the_whole_run(folder, init_checkpoint, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_tiny_args(folder, init_checkpoint, whole, "--epochs", 2)) == 0
    assert main(_tiny_args(folder, init_checkpoint, parts, "--epochs", 2, "--stop-after", 1)) == 0
    assert "stopped after epoch 1 of 2 as asked; continue with --resume" in capsys.readouterr().out
    assert len(_history(parts)) == 1 and not (parts / "summary.json").exists()
    assert main(_tiny_args(folder, init_checkpoint, parts, "--epochs", 2, "--resume")) == 0
    assert (parts / "summary.json").exists()
    assert [r["train_loss"] for r in _history(parts)] == [r["train_loss"] for r in _history(whole)]
    for key, value in _last(whole)["state_dict"].items():
        assert torch.equal(_last(parts)["state_dict"][key], value), key
