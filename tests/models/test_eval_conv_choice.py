"""Eval mode: SelecSLS's large convs run as oneDNN's conv or the im2col product, chosen inside the
model, exactly; training, TorchScript, tracing (ONNX), torch.compile and FLOP counting see the conv."""

import collections
import functools
import io

import pytest
import torch
import torch.nn.functional as F

import selecsls.models.conv as conv_module
from selecsls import count_macs, create_model, list_models
from selecsls.models.conv import SmallMapConv2d, eval_conv_choices
from sparse_models import tiny_spec, trained_like


def relative_diff(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


@functools.cache
def eval_model(name):
    return create_model(name).eval()


def _counting(calls, function):
    def wrapper(*args, **kwargs):
        calls.append(args[1].shape)  # the weight
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("batch, height, width", [(2, 32, 32), (1, 224, 224), (1, 320, 512)])
def test_every_variant_in_eval_equals_the_plain_conv_network(monkeypatch, name, batch, height, width):
    """Forced product, timed choice and plain convs agree within 1e-5 relative (float32); the
    product really runs for the large convs only."""
    model = eval_model(name)
    large = [m for m in model.modules() if isinstance(m, SmallMapConv2d) and m.large()]
    assert len(large) == 4  # the head: the convs of a million weights or more
    x = torch.randn(batch, 3, height, width)
    products = []
    monkeypatch.setattr(conv_module, "conv2d_as_matmul", _counting(products, conv_module.conv2d_as_matmul))
    outputs = {}
    with torch.no_grad():
        for algorithm in ("conv", "matmul", "auto"):
            monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
            products.clear()
            outputs[algorithm] = model(x)
            if algorithm != "auto":
                assert sorted(products) == sorted(m.weight.shape for m in large if algorithm == "matmul")
    for algorithm in ("matmul", "auto"):
        assert relative_diff(outputs[algorithm], outputs["conv"]) <= 1e-5, algorithm
    choices = eval_conv_choices(model)
    assert len(choices) == 4 and all(len(per_input) >= 1 for per_input in choices.values())


@pytest.mark.parametrize(
    "kernel, conv_seconds, expected",
    [(3, 1.0, "conv"), (3, 1.5, "matmul"), (3, 2.5, "matmul"), (1, 1.5, "conv"), (1, 2.5, "matmul")],
)  # the product takes 2.0; a spatial conv copies its weight per call: kept only when 1.5x faster
def test_auto_times_once_per_input_and_keeps_the_faster_with_near_ties_to_the_product(
    monkeypatch, kernel, conv_seconds, expected
):
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)  # this small conv takes the choice
    monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "auto")
    conv = SmallMapConv2d(6, 5, kernel, stride=2, padding=kernel // 2).eval()
    timings = []

    def fake_timer(fns, repeats):
        timings.append(sorted(fns))
        return {"conv": conv_seconds, "matmul": 2.0}

    monkeypatch.setattr(conv_module, "fastest_seconds", fake_timer)
    small, other = torch.randn(1, 6, 9, 9), torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        for x in (small, small, other, small):
            expected_out = F.conv2d(x, conv.weight, conv.bias, 2, kernel // 2)
            torch.testing.assert_close(conv(x), expected_out, rtol=1e-5, atol=1e-6)
    assert timings == [["conv", "matmul"]] * 2  # once per input shape
    threads = torch.get_num_threads()
    assert conv.eval_choices == {
        f"1x6x9x9 float32, threads={threads}": expected,
        f"2x6x9x9 float32, threads={threads}": expected,
    }


def test_training_runs_its_own_path_and_never_the_eval_choice(monkeypatch):
    calls = collections.Counter()
    for method in ("_eval_forward", "_gemm_forward"):
        original = getattr(SmallMapConv2d, method)
        monkeypatch.setattr(
            SmallMapConv2d, method, lambda self, *args, m=method, f=original: calls.update([m]) or f(self, *args)
        )
    monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "matmul")
    model = create_model("selecsls42b", num_classes=10)
    x = torch.randn(2, 3, 64, 64)  # the last head convs see 1x1 maps: training takes its product
    model.train()(x)
    trained = calls["_gemm_forward"]
    assert trained >= 2 and calls["_eval_forward"] == 0
    with torch.no_grad():
        model.eval()(x)
    convs = sum(isinstance(m, SmallMapConv2d) for m in model.modules())
    assert calls == {"_gemm_forward": trained, "_eval_forward": convs}


def test_flop_counting_and_dispatch_modes_see_the_conv(monkeypatch):
    model = create_model("selecsls42b").eval()
    expected = count_macs(model, (1, 3, 64, 64))
    for algorithm in ("auto", "matmul"):
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
        assert count_macs(model, (1, 3, 64, 64)) == expected
    assert eval_conv_choices(model) == {}


@pytest.fixture
def tiny(monkeypatch):
    """A tiny model in which every conv takes the eval choice (threshold lowered)."""
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)
    return trained_like(create_model(tiny_spec(), num_classes=10))


def _op_counts(graph):
    return collections.Counter(node.kind() for node in graph.nodes())


def test_torchscript_is_unchanged(monkeypatch, tiny):
    x = torch.randn(1, 3, 64, 64)
    graphs, outputs = {}, {}
    for algorithm in ("conv", "matmul", "auto"):
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
        scripted = torch.jit.freeze(torch.jit.script(tiny))
        graphs[algorithm] = _op_counts(scripted.graph)
        with torch.no_grad():
            outputs[algorithm] = scripted(x)
    assert graphs["conv"] == graphs["matmul"] == graphs["auto"]
    assert graphs["conv"]["aten::conv2d"] == sum(isinstance(m, SmallMapConv2d) for m in tiny.modules())
    assert not {"aten::im2col", "aten::matmul"} & graphs["conv"].keys()
    torch.testing.assert_close(outputs["matmul"], outputs["conv"], rtol=0, atol=0)


def test_onnx_export_and_torch_compile_see_the_conv(monkeypatch, tiny):
    onnx = pytest.importorskip("onnx")
    x = torch.randn(1, 3, 64, 64)
    monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "conv")
    with torch.no_grad():
        expected = tiny(x)
    exported, compiled = {}, {}
    for algorithm in ("conv", "matmul", "auto"):
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
        buffer = io.BytesIO()
        torch.onnx.export(tiny, (x,), buffer, dynamo=False)
        exported[algorithm] = [node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node]

        graphs = []

        def capture(graph_module, example_inputs, graphs=graphs):
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(tiny, backend=capture)(x), expected, rtol=1e-5, atol=1e-6)
        (graph,) = graphs
        compiled[algorithm] = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    torch._dynamo.reset()
    convs = sum(isinstance(m, SmallMapConv2d) for m in tiny.modules())
    assert exported["conv"] == exported["matmul"] == exported["auto"] and exported["conv"].count("Conv") == convs
    assert compiled["conv"] == compiled["matmul"] == compiled["auto"]
    assert not any("unfold" in target or "matmul" in target for target in compiled["conv"])
    assert eval_conv_choices(tiny) == {}  # nothing was timed: export and compilation ran the plain conv
