import json

import pytest
import torch
from PIL import Image
from torch import nn

import selecsls
from selecsls import count_flops, count_macs, create_model
from selecsls.bench.memory import _allocated_peak_bytes, saved_tensor_bytes
from selecsls.bench.runner import (
    FULL_BATCH_SIZES,
    FULL_SIZES,
    QUICK_SHAPES,
    BenchSettings,
    best_vs_best,
    grid_shapes,
    run_benchmark,
    shape_key,
    size_label,
    summarize,
    time_interleaved,
)
from selecsls.cli import main
from selecsls.deploy.backends import BACKENDS, Backend, BackendUnavailable, device_backends
from selecsls.models.baselines import create_baseline
from sparse_models import tiny_spec, trained_like


def test_time_interleaved_runs_round_robin_with_a_rotating_start():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    samples = time_interleaved(fns, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(value >= 0 for values in samples.values() for value in values)


def test_time_interleaved_brackets_each_call_with_sync():
    events = []
    time_interleaved({"f": lambda: events.append("call")}, warmup=0, repeats=2, sync=lambda: events.append("sync"))
    assert events == ["sync", "sync", "call", "sync", "sync", "call", "sync"]


@pytest.mark.parametrize("warmup, repeats", [(-1, 3), (0, 0)])
def test_time_interleaved_rejects_bad_counts(warmup, repeats):
    with pytest.raises(ValueError, match="must be"):
        time_interleaved({"f": lambda: None}, warmup, repeats)


def test_summarize_gives_median_and_interquartile_range():
    assert summarize([5.0, 1.0, 3.0, 2.0, 4.0]) == dict(median=3.0, q1=2.0, q3=4.0, iqr=2.0, min=1.0, n=5)


def test_saved_tensor_bytes_of_a_hand_built_network():
    network = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 1, bias=False),
    )
    batch, size, float_bytes = 2, 8, 4
    by_hand = float_bytes * (
        batch * 3 * size * size  # conv1 keeps its input for the weight gradient
        + batch * 4 * size * size  # BatchNorm keeps its input (conv1's output) ...
        + 2 * 4  # ... and per-channel batch mean and inverse std
        + batch * 4 * size * size  # ReLU keeps its output; conv2 reads that same storage (counted once)
    )  # weights and BN running statistics are not activations
    assert saved_tensor_bytes(network, (batch, 3, size, size)) == by_hand


def test_selecsls60_keeps_about_half_the_activations_of_resnet50_for_backward():
    # The published claim at large batch or image size; conv6 never materialises its concatenation.
    shape = (8, 3, 512, 512)
    ratio = saved_tensor_bytes(create_model("selecsls60"), shape) / saved_tensor_bytes(
        create_baseline("resnet50"), shape
    )
    assert 0.50 < ratio < 0.55


def test_live_peak_counts_the_tensors_held_at_once():
    def call():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB: 6 MB held
        del a
        c = torch.empty(250, 1000)  # 1 MB: 3 MB held
        return b, c

    assert _allocated_peak_bytes(call) == 6_000_000


def test_flop_count_of_a_single_conv_matches_the_formula():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    out_pixels = 8 * 8  # 16x16 input, stride 2
    assert count_flops(conv, (2, 3, 16, 16)) == 2 * 2 * out_pixels * 8 * 3 * 3 * 3


def test_grid_shapes_presets_and_overrides():
    assert grid_shapes() == QUICK_SHAPES
    assert grid_shapes("full") == tuple((b, *s) for b in FULL_BATCH_SIZES for s in FULL_SIZES)
    assert grid_shapes("realtime") == ((1, 224, 224), (1, 320, 512), (1, 512, 512))
    assert grid_shapes(sizes=((64, 64), (48, 96)), batch_sizes=(2,)) == ((2, 64, 64), (2, 48, 96))
    assert grid_shapes("full", batch_sizes=(1,)) == tuple((1, *s) for s in FULL_SIZES)
    assert grid_shapes("realtime", sizes=((32, 32),)) == ((1, 32, 32),)
    with pytest.raises(ValueError, match="preset must be one of quick, full, realtime"):
        grid_shapes("fast")


def test_size_labels_name_width_by_height():
    assert (size_label(224, 224), size_label(320, 512), shape_key(1, 320, 512)) == ("224", "512x320", "1x512x320")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(models=("resnet51",)), "choose from .*resnet50"),
        (dict(backends=("tensorrt",)), "choose from eager"),
        (dict(shapes=((1, 0, 32),)), "must be positive"),
        (dict(shapes=((1, 32),)), "must be positive \\(batch, height, width\\)"),
        (dict(repeats=0), "repeats >= 1"),
    ],
)
def test_bench_settings_name_the_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**kwargs)


def test_backends_match_eager_on_a_tiny_selecsls():
    model = trained_like(create_model(tiny_spec(), num_classes=10))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = BACKENDS["eager"](model, images)()
        for name in ("channels_last", "fused"):
            torch.testing.assert_close(BACKENDS[name](model, images)(), expected, rtol=1e-4, atol=1e-4)
        assert BACKENDS["pruned"](model, images)().shape == expected.shape
        logits = BACKENDS["pruned_int8"](model, images)()
        assert logits.shape == expected.shape


def test_unavailable_backends_raise_with_a_reason():
    with pytest.raises(BackendUnavailable, match="SelecSLS models only"):
        BACKENDS["pruned"](create_model("resnet50"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(BackendUnavailable, match="SelecSLS models only"):
        BACKENDS["pruned_int8"](create_model("resnet50"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(BackendUnavailable, match="selecsls_no_such_module is not importable"):
        Backend("missing", "module absent", "selecsls_no_such_module:run")(nn.Identity(), torch.zeros(1))
    for name in ("cuda_graphs", "cuda_graphs_fp16"):
        with pytest.raises(BackendUnavailable, match=f"backend {name} runs on cuda only; the example is on cpu"):
            BACKENDS[name](create_model("resnet50"), torch.zeros(1, 3, 32, 32))


def needs_hardware(model, example):
    raise BackendUnavailable("no accelerator here")


def test_run_benchmark_records_a_skipped_backend_with_its_reason(monkeypatch):
    monkeypatch.setitem(
        BACKENDS, "needs_hardware", Backend("needs_hardware", "needs an accelerator", "test_benchmark:needs_hardware")
    )
    settings = BenchSettings(
        models=("selecsls42b",),
        shapes=((1, 32, 32),),
        backends=("eager", "needs_hardware"),
        warmup=0,
        repeats=2,
        memory_shapes=((2, 64, 64),),
    )
    monkeypatch.setattr(
        "selecsls.bench.runner.inference_memory_bytes",
        lambda *args: {"inference_rss_growth_bytes": {"selecsls42b": [1]}},
    )
    result = run_benchmark(settings)
    eager, skipped = result["latency"]
    assert eager["status"] == "ok" and len(eager["samples_s"]) == 2
    assert skipped.pop("load_average") == eager["load_average"]  # read once after the cell (bench.reliability)
    assert skipped == dict(
        model="selecsls42b",
        backend="needs_hardware",
        batch=1,
        height=32,
        width=32,
        status="skipped",
        reason="no accelerator here",
    )


@pytest.mark.slow
def test_bench_command_writes_json_and_png(tmp_path, capsys):
    prefix = tmp_path / "bench"
    argv = [
        "bench",
        "--models",
        "selecsls42b,resnet50",
        "--sizes",
        "64",
        "--batch-sizes",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--backends",
        "fused",
        "--memory-sizes",
        "64,48x32",
        "--output",
        str(prefix),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "selecsls42b fused" in out and "speed-up" in out and "x resnet50" in out
    assert "Whole process, resident memory after those 3 calls:" in out and "frozen MiB" in out
    # Whether to trust the timings comes last (this machine may be busy: either verdict, never none).
    verdict = out.split("\n\nwrote ")[0].rsplit("\n\n", 1)[-1]
    assert verdict.startswith(("Timings look reliable", "UNRELIABLE TIMINGS"))

    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["torch"] == torch.__version__
    assert [(r["model"], r["backend"], r["status"]) for r in result["latency"]] == [  # eager, frozen first, always
        ("selecsls42b", "eager", "ok"),
        ("selecsls42b", "frozen", "ok"),
        ("selecsls42b", "fused", "ok"),
        ("resnet50", "eager", "ok"),
        ("resnet50", "frozen", "ok"),
        ("resnet50", "fused", "ok"),
    ]
    assert all(len(r["samples_s"]) == 2 and r["summary"]["n"] == 2 for r in result["latency"])
    assert all(len(r["load_average"]) == 3 for r in result["latency"]) and "unreliable" in result["reliability"]
    assert result["models"]["selecsls42b"]["macs_per_image"]["64"] == count_macs(
        create_model("selecsls42b"), (1, 3, 64, 64)
    )
    saved = result["memory"]["saved_tensor_bytes"]
    assert saved["resnet50"]["8x512"] > saved["selecsls42b"]["8x512"] > 0
    for measure in ("inference_rss_growth_bytes", "inference_live_peak_bytes"):
        assert set(result["memory"][measure]["resnet50"]) == {"1x64", "1x48x32"}
    live = result["memory"]["inference_live_peak_bytes"]
    assert live["resnet50"]["1x64"] > live["resnet50"]["1x48x32"] > 0  # more pixels, more activations
    weights = result["memory"]["weight_bytes"]
    state = create_model("selecsls42b").state_dict().values()
    assert weights["selecsls42b"]["weights"] == sum(t.numel() * t.element_size() for t in state)
    for measure in ("process_load_peak_bytes", "process_run_peak_bytes", "process_steady_bytes"):
        for model in ("selecsls42b", "resnet50"):  # each model's weights are in the process: at least most of them
            assert set(result["memory"][measure][model]) == {"eager", "frozen"}
            assert min(result["memory"][measure][model].values()) > weights[model]["weights"] / 2, (measure, model)
    with Image.open(prefix.with_suffix(".png")) as plot:
        assert plot.format == "PNG" and plot.size[0] > 0


def test_bench_command_reports_a_bad_model_in_one_line(capsys):
    assert main(["bench", "--models", "selecsls61"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("selecsls bench: error: unknown or no models ['selecsls61']") and "\n" not in error


def _record(model, backend, median, height=32, width=32, status="ok"):
    return dict(
        model=model, backend=backend, batch=1, height=height, width=width, status=status, summary=dict(median=median)
    )


def test_best_vs_best_takes_each_models_fastest_backend_per_precision():
    result = dict(
        reference="resnet50",
        models={"selecsls60": {"macs_per_image": {"32": 100}}, "resnet50": {"macs_per_image": {"32": 150}}},
        latency=[
            _record("selecsls60", "eager", 0.010),
            _record("selecsls60", "onnxruntime", 0.008),
            _record("selecsls60", "pruned", 0.001),  # a different (narrower) network: never competes
            _record("selecsls60", "int8", 0.004),
            _record("selecsls60", "openvino", 0.001, status="skipped"),
            _record("resnet50", "eager", 0.012),
            _record("resnet50", "openvino", 0.009),
            _record("resnet50", "openvino_int8", 0.005),
        ],
    )
    rows = {(row["precision"], row["model"]): row for row in best_vs_best(result)}
    assert len(rows) == 4
    fp32 = rows[("fp32", "selecsls60")]
    assert (fp32["backend"], fp32["median_s"], fp32["frames_per_s"]) == ("onnxruntime", 0.008, 125.0)
    assert fp32["speedup"] == pytest.approx(0.009 / 0.008) and fp32["mac_bound"] == 1.5
    int8 = rows[("int8", "selecsls60")]
    assert (int8["backend"], int8["speedup"]) == ("int8", pytest.approx(0.005 / 0.004))
    assert rows[("int8", "resnet50")]["speedup"] == 1.0


def test_realtime_backends_are_every_backend_of_the_same_network_that_can_run_on_the_device():
    cpu, cuda = device_backends("cpu"), device_backends("cuda")
    assert {"eager", "compile", "onnxruntime", "int8", "openvino", "openvino_int8"} <= set(cpu)
    assert not {"cuda_graphs", "cuda_graphs_fp16", "pruned", "pruned_int8"} & set(cpu)
    assert {"cuda_graphs", "cuda_graphs_fp16", "compile"} <= set(cuda) and "onnxruntime" not in cuda


def test_realtime_bench_writes_one_best_vs_best_row_per_model_and_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("selecsls.bench.runner.inference_memory_bytes", lambda models, shapes, threads: {})
    prefix = tmp_path / "realtime"
    argv = ["bench", "--realtime", "--models", "selecsls42b,resnet50", "--backends", "eager,fused", "--process-memory"]
    argv += ["none"]
    argv += ["--sizes", "32,48x32", "--warmup", "0", "--repeats", "2", "--threads", "1", "--output", str(prefix)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Best vs best" in out and "b1 48x32px ms (IQR)" in out
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["settings"]["shapes"] == [[1, 32, 32], [1, 32, 48]]
    rows = result["best_vs_best"]
    assert sorted((r["model"], r["height"], r["width"]) for r in rows) == [
        ("resnet50", 32, 32),
        ("resnet50", 32, 48),
        ("selecsls42b", 32, 32),
        ("selecsls42b", 32, 48),
    ]
    for row in rows:
        assert row["precision"] == "fp32" and row["backend"] in ("eager", "frozen", "fused") and row["frames_per_s"] > 0
        assert row["speedup"] > 0 and row["mac_bound"] > 0
    assert set(result["models"]["selecsls42b"]["macs_per_image"]) == {"32", "48x32"}
    with Image.open(prefix.with_suffix(".png")) as plot:
        assert plot.format == "PNG"


def test_bench_rejects_a_malformed_size(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--sizes", "512by320"])
    assert "expected comma-separated sizes such as 224,512x320" in capsys.readouterr().err


def test_bench_times_a_model_file_beside_the_named_networks(tmp_path, capsys):
    # A pruned network is benchmarked as saved, next to resnet50 (the ratios' reference).
    pruned = tmp_path / "pruned.pt"
    selecsls.save(selecsls.prune_to_budget(create_model("selecsls42b", num_classes=10).eval(), macs=0.3), pruned)
    argv = ["bench", "--models", f"{pruned},resnet50", "--sizes", "32", "--batch-sizes", "1", "--warmup", "0"]
    argv += ["--repeats", "2", "--threads", "1", "--memory-sizes", "32", "--process-memory", "none"]
    argv += ["--output", str(tmp_path / "bench")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["model"], r["backend"], r["status"]) for r in result["latency"]] == [
        (str(pruned), "eager", "ok"),
        (str(pruned), "frozen", "ok"),
        ("resnet50", "eager", "ok"),
        ("resnet50", "frozen", "ok"),
    ]
    macs = result["models"][str(pruned)]["macs_per_image"]["32"]
    assert (
        macs
        == count_macs(selecsls.load(pruned), (1, 3, 32, 32))
        < 0.31 * count_macs(create_model("selecsls42b"), (1, 3, 32, 32))
    )
    capsys.readouterr()
    assert main(["bench", "--models", str(tmp_path / "missing.pt")]) == 2
    assert "model file(s) ['" in capsys.readouterr().err


def test_the_cli_names_the_process_memory_engines_of_bench_memory():
    from selecsls.bench.memory import PROCESS_ENGINES
    from selecsls.cli.bench import PROCESS_ENGINES as cli_engines

    assert cli_engines == PROCESS_ENGINES


@pytest.mark.slow
def test_process_memory_counts_each_engine_in_a_fresh_process():
    """Whole-process memory of serving a model: the weights are resident on every engine; a missing
    runtime is named, not fatal."""
    from selecsls.bench.memory import process_memory_bytes

    model = create_model("selecsls42b").eval()
    result = process_memory_bytes({"selecsls42b": model}, ("eager", "frozen"), (1, 3, 64, 64), threads=1)
    weights = result["weight_bytes"]["selecsls42b"]["weights"]
    assert weights == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for measure in ("process_load_peak_bytes", "process_run_peak_bytes", "process_steady_bytes"):
        assert set(result[measure]["selecsls42b"]) == {"eager", "frozen"}
    for engine in ("eager", "frozen"):
        steady = result["process_steady_bytes"]["selecsls42b"][engine]
        assert 0.9 * weights < steady <= result["process_load_peak_bytes"]["selecsls42b"][engine] + 64 * 2**20
    with pytest.raises(ValueError, match="unknown engines \\['tflite'\\]"):
        process_memory_bytes({"m": model}, ("tflite",))
