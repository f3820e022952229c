"""Eval mode: SelecSLS's convs run on weights kept in oneDNN's layout, large ones as the im2col
product where that is faster, chosen inside the model, exactly; the kept weights follow every
change of the weight; training, TorchScript, tracing (ONNX), torch.compile and FLOP counting see
the conv."""

import collections
import concurrent.futures
import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import selecsls.models.conv as conv_module
from selecsls import count_macs, create_model, list_models
from selecsls.models.conv import SmallMapConv2d, eval_conv_choices, packed_weight_bytes
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
    """Reordered weights, forced product, timed choice and plain convs agree within 1e-5 relative
    (float32); the product runs for the large convs only, the reordered weights for the others."""
    model = eval_model(name)
    convs = [m for m in model.modules() if isinstance(m, SmallMapConv2d)]
    large = [m for m in convs if m.large()]
    assert len(large) == 4  # the head: the convs of a million weights or more
    x = torch.randn(batch, 3, height, width)
    products, reordered = [], []
    monkeypatch.setattr(conv_module, "conv2d_as_matmul", _counting(products, conv_module.conv2d_as_matmul))
    monkeypatch.setattr(SmallMapConv2d, "_packed_forward", _counting(reordered, SmallMapConv2d._packed_forward))
    outputs = {}
    with torch.no_grad():
        for algorithm in ("conv", "packed", "matmul", "auto"):
            monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
            products.clear()
            reordered.clear()
            outputs[algorithm] = model(x)
            if algorithm != "auto":
                assert len(products) == (len(large) if algorithm == "matmul" else 0)
                assert len(reordered) == {"conv": 0, "packed": len(convs), "matmul": len(convs) - len(large)}[algorithm]
    for algorithm in ("packed", "matmul", "auto"):
        assert relative_diff(outputs[algorithm], outputs["conv"]) <= 1e-5, algorithm
        assert outputs[algorithm].is_contiguous()
    choices = eval_conv_choices(model)
    assert len(choices) == 4 and all(len(per_input) >= 1 for per_input in choices.values())
    assert all(choice in ("packed", "matmul") for per_input in choices.values() for choice in per_input.values())


@pytest.mark.parametrize(
    "kernel, record_grad, conv_seconds, expected",
    [
        (3, False, 1.9, "packed"),  # the kept weight copies nothing: the faster wins
        (3, False, 2.1, "matmul"),
        (3, True, 1.0, "conv"),  # autograd recording: the plain conv copies its weight, kept only 1.5x faster
        (3, True, 1.5, "matmul"),
        (3, True, 2.5, "matmul"),
        (1, True, 1.5, "conv"),
        (1, True, 2.5, "matmul"),
    ],
)  # the product takes 2.0
def test_auto_times_once_per_input_and_keeps_the_faster(monkeypatch, kernel, record_grad, conv_seconds, expected):
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)  # this small conv takes the choice
    monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "auto")
    conv = SmallMapConv2d(6, 5, kernel, stride=2, padding=kernel // 2).eval()
    rival = "conv" if record_grad else "packed"
    timings = []

    def fake_timer(fns, repeats):
        timings.append(sorted(fns))
        return {rival: conv_seconds, "matmul": 2.0}

    monkeypatch.setattr(conv_module, "fastest_seconds", fake_timer)
    small, other = torch.randn(1, 6, 9, 9), torch.randn(2, 6, 9, 9)
    with torch.set_grad_enabled(record_grad):
        for x in (small, small, other, small):
            expected_out = F.conv2d(x, conv.weight, conv.bias, 2, kernel // 2)
            torch.testing.assert_close(conv(x), expected_out, rtol=1e-5, atol=1e-6)
    assert timings == [sorted([rival, "matmul"])] * 2  # once per input shape
    mode = ", unpacked" if record_grad else ""
    threads = torch.get_num_threads()
    assert conv.eval_choices == {
        f"1x6x9x9 float32, threads={threads}{mode}": expected,
        f"2x6x9x9 float32, threads={threads}{mode}": expected,
    }
    assert (conv.packed is not None) == (expected == "packed")  # a copy is kept only where it is used


def _reference(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _round_trip_data(conv):
    """Replace the weight's data twice, past ``Module._apply``: the first copy is freed before the
    second is made, so the allocator may put the final weight where the original was."""
    conv.weight.data = conv.weight.data.half()
    conv.weight.data = conv.weight.data.float()


def test_the_reordered_weight_is_kept_and_follows_every_change_of_the_weight():
    """Reused while nothing changes; rebuilt after each way PyTorch changes a weight; freed by
    train(); never copied or pickled."""
    torch.manual_seed(0)
    conv = SmallMapConv2d(8, 16, 3, padding=1).eval()
    x = torch.randn(1, 8, 12, 12)

    def check():
        with torch.no_grad():
            assert relative_diff(conv(x), _reference(conv, x)) <= 1e-5
        return conv.packed

    first = check()
    assert first is not None and check() is first
    assert packed_weight_bytes(conv) >= conv.weight.numel() * 4
    changes = {
        "in-place op": lambda: conv.weight.mul_(-2),
        "load_state_dict": lambda: conv.load_state_dict({"weight": torch.randn(16, 8, 3, 3), "bias": conv.bias}),
        "assigning .data": lambda: setattr(conv.weight, "data", torch.randn(16, 8, 3, 3)),
        "a new Parameter": lambda: setattr(conv, "weight", torch.nn.Parameter(torch.randn(16, 8, 3, 3))),
        "round trip to float64": lambda: conv.double().float(),
        "round trip to float16 (new values)": lambda: conv.half().float(),
        "round trip of .data by hand (new values, often at the old address)": lambda: _round_trip_data(conv),
    }
    for change, apply in changes.items():
        before = conv.packed
        with torch.no_grad():
            apply()
        assert check() is not before, change
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(torch.randn(1, 8, 12, 12)).sum().backward()  # eval mode, recording autograd: the plain conv
    before = conv.packed
    optimizer.step()
    assert check() is not before
    before = conv.packed
    x = torch.randn(2, 8, 10, 10)  # another input shape
    assert check() is not before
    clone = copy.deepcopy(conv)
    assert clone.packed is None and pickle.loads(pickle.dumps(conv)).packed is None
    with torch.no_grad():
        assert relative_diff(clone(x), _reference(conv, x)) <= 1e-5
    with torch.no_grad():
        conv.weight.data.mul_(3)  # invisible to PyTorch's version counter: eval() starts afresh
    conv.eval()
    check()
    conv.train()
    assert conv.packed is None and packed_weight_bytes(conv) == 0


def test_threads_sharing_one_model_get_the_right_outputs(monkeypatch):
    """A server's threads call one eval model with inputs of two shapes, so kept weights are
    replaced while other calls use them."""
    torch.manual_seed(0)
    model = create_model(tiny_spec(), num_classes=10).eval()
    inputs = [torch.randn(1, 3, 32 + 16 * (i % 2), 32) for i in range(8)]
    with torch.no_grad():
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "conv")
        expected = [model(x) for x in inputs]
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "packed")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                for got, want in zip(pool.map(model, inputs), expected):
                    assert relative_diff(got, want) <= 1e-5


def test_gradients_autocast_and_other_dtypes_in_eval_take_the_plain_conv(monkeypatch):
    monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", "packed")
    conv = SmallMapConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    expected = torch.autograd.grad(_reference(conv, x).square().sum(), [x, conv.weight])
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(conv.weight.grad, expected[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.detach()).dtype == torch.bfloat16
    with torch.no_grad():
        conv.double()(x.detach().double())
    assert conv.packed is None


def test_dilated_features_are_exact_and_come_out_in_the_standard_layout(monkeypatch):
    model = create_model("selecsls42b", features_only=True, output_stride=8).eval()
    x = torch.randn(1, 3, 96, 64)
    outputs = {}
    with torch.no_grad():
        for algorithm in ("conv", "auto"):
            monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
            outputs[algorithm] = model(x)
    for packed, plain in zip(outputs["auto"], outputs["conv"]):
        assert packed.is_contiguous() and relative_diff(packed, plain) <= 1e-5
    assert packed_weight_bytes(model) > 0


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
    for algorithm in ("auto", "packed", "matmul"):
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
        assert count_macs(model, (1, 3, 64, 64)) == expected
    assert eval_conv_choices(model) == {} and packed_weight_bytes(model) == 0


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
    for algorithm in ("conv", "packed", "matmul", "auto"):
        monkeypatch.setattr(SmallMapConv2d, "eval_algorithm", algorithm)
        scripted = torch.jit.freeze(torch.jit.script(tiny))
        graphs[algorithm] = _op_counts(scripted.graph)
        with torch.no_grad():
            outputs[algorithm] = scripted(x)
    assert graphs["conv"] == graphs["packed"] == graphs["matmul"] == graphs["auto"]
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
    for algorithm in ("conv", "packed", "matmul", "auto"):
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
    assert exported["conv"] == exported["packed"] == exported["matmul"] == exported["auto"]
    assert exported["conv"].count("Conv") == convs
    assert compiled["conv"] == compiled["packed"] == compiled["matmul"] == compiled["auto"]
    assert not any("unfold" in target or "matmul" in target for target in compiled["conv"])
    assert eval_conv_choices(tiny) == {}  # nothing was timed: export and compilation ran the plain conv
    assert packed_weight_bytes(tiny) == 0


def test_a_torch_without_onednn_takes_the_plain_conv(monkeypatch):
    monkeypatch.setattr(conv_module, "_onednn_kept_weights", lambda: False)
    model = create_model(tiny_spec(), num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert packed_weight_bytes(model) == 0
