"""Eval mode keeps PyTorch's semantics: every call computes from the current weights (untracked edits
included), large convs on small maps run as the exact im2col product, and TorchScript, tracing
(ONNX), torch.compile and FLOP counting see the conv."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from selecsls import count_macs, create_model, list_models, save
from selecsls.models.conv import SmallMapConv2d
from selecsls.models.loading import load
from sparse_models import tiny_spec, trained_like


def relative_diff(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def _counting(calls, method):
    def wrapper(self, *args):
        calls.append(self)
        return method(self, *args)

    return wrapper


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("batch, height, width", [(2, 32, 32), (1, 224, 224), (1, 320, 512)])
def test_every_variant_in_eval_equals_the_plain_conv_network(monkeypatch, name, batch, height, width):
    """The product runs for the large spatial convs on small maps only, within 1e-5 relative of the conv."""
    model = create_model(name).eval()
    x = torch.randn(batch, 3, height, width)
    products = []
    monkeypatch.setattr(SmallMapConv2d, "_gemm_forward", _counting(products, SmallMapConv2d._gemm_forward))
    with torch.no_grad():
        out = model(x)
        with monkeypatch.context() as plain:
            plain.setattr(SmallMapConv2d, "gemm_max_eval_positions", 0)
            expected = model(x)
    assert relative_diff(out, expected) <= 1e-5
    assert [conv for conv in model.modules() if conv in products] == [model.head[i].conv for i in range(3)]
    assert all(conv.kernel_size == (3, 3) and conv.weight.numel() >= 2**20 for conv in products)


def test_a_large_map_or_batch_runs_the_conv(monkeypatch):
    """Above ``gemm_max_eval_positions`` output positions (batch x pixels) the conv was faster."""
    products = []
    monkeypatch.setattr(SmallMapConv2d, "_gemm_forward", _counting(products, SmallMapConv2d._gemm_forward))
    conv = SmallMapConv2d(1024, 1024, 3, padding=1).eval()
    with torch.no_grad():
        conv(torch.randn(1, 1024, 16, 16))
        assert len(products) == 1
        conv(torch.randn(2, 1024, 16, 16))
        conv(torch.randn(1, 1024, 17, 16))
    assert len(products) == 1


def _edits(model):
    """Weight edits PyTorch does not track (no version counter bump, or none it could see)."""
    conv = model.head[2].conv
    stem = model.stem.conv

    def storage_copy():
        new = torch.randn_like(stem.weight)
        stem.weight.untyped_storage().copy_(new.untyped_storage())

    def numpy_write():
        stem.weight.detach().numpy()[...] = torch.randn_like(stem.weight).numpy()

    def bn_data():
        model.stem.bn.running_var.data.mul_(3)

    return {
        ".data.mul_": lambda: conv.weight.data.mul_(0.5),
        "small conv .data.mul_": lambda: model.features[0].conv1.conv.weight.data.mul_(-2),
        "numpy write": numpy_write,
        ".data.copy_": lambda: conv.weight.data.copy_(torch.randn_like(conv.weight)),
        "untyped_storage().copy_": storage_copy,
        "detach().mul_": lambda: model.head[3].conv.weight.detach().mul_(0.25),
        "BN buffer .data": bn_data,
        "in-place op": lambda: model.features[1].conv2.conv.weight.mul_(1.5),
    }


@pytest.mark.parametrize("origin", ["built", "deepcopy", "unpickled"])
def test_every_untracked_edit_after_the_first_call_shows_in_the_next(origin):
    """After the first eval call, each edit PyTorch cannot see reaches the next call: the outputs
    equal a fresh model built from the state dict within 1e-5."""
    torch.manual_seed(0)
    model = trained_like(create_model("selecsls42b", num_classes=10))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        model(x)  # a first call, as a cache would make
    model = {"built": model, "deepcopy": copy.deepcopy(model), "unpickled": pickle.loads(pickle.dumps(model))}[origin]
    fresh = create_model("selecsls42b", num_classes=10).eval()
    with torch.no_grad():
        model(x)
        for edit_name, edit in _edits(model).items():
            edit()
            fresh.load_state_dict(model.state_dict())
            assert relative_diff(model(x), fresh(x)) <= 1e-5, edit_name


def test_the_saved_file_and_the_edited_model_agree(tmp_path):
    torch.manual_seed(0)
    model = trained_like(create_model("selecsls42b", num_classes=10))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.head[2].conv.weight.data.mul_(0.5)
        save(model, tmp_path / "m.safetensors")
        assert relative_diff(model(x), load(tmp_path / "m.safetensors").eval()(x)) <= 1e-5


def test_convs_keep_no_state_beyond_nn_conv2d():
    model = create_model("selecsls42b").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    plain = set(vars(torch.nn.Conv2d(1, 1, 1)))
    assert all(set(vars(m)) == plain for m in model.modules() if isinstance(m, SmallMapConv2d))


def test_gradients_and_autocast_in_eval_match_the_conv(monkeypatch):
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)  # this small conv takes the product
    conv = SmallMapConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    conv(x).square().sum().backward()
    reference = F.conv2d(x, conv.weight, conv.bias, 1, 1)
    expected = torch.autograd.grad(reference.square().sum(), [x, conv.weight])
    torch.testing.assert_close(x.grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad, expected[1], rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x.detach()).dtype == torch.bfloat16


def test_dilated_features_are_exact():
    model = create_model("selecsls42b", features_only=True, output_stride=8).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        outputs = model(x)
        with pytest.MonkeyPatch.context() as plain:
            plain.setattr(SmallMapConv2d, "gemm_max_eval_positions", 0)
            expected = model(x)
    for got, want in zip(outputs, expected):
        assert got.is_contiguous() and relative_diff(got, want) <= 1e-5


def test_flop_counting_and_dispatch_modes_see_the_conv(monkeypatch):
    model = create_model("selecsls42b").eval()
    products = []
    monkeypatch.setattr(SmallMapConv2d, "_gemm_forward", _counting(products, SmallMapConv2d._gemm_forward))
    count_macs(model, (1, 3, 64, 64))
    assert products == []


@pytest.fixture
def tiny(monkeypatch):
    """A tiny model in which every spatial conv takes the product (threshold lowered)."""
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)
    return trained_like(create_model(tiny_spec(), num_classes=10))


def test_onnx_export_and_torch_compile_see_the_conv(tiny):
    onnx = pytest.importorskip("onnx")
    from selecsls.deploy.export import to_onnx

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny(x)
    exported = [node.op_type for node in onnx.load_from_string(to_onnx(tiny, x)).graph.node]
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(tiny, backend=capture)(x), expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    (graph,) = graphs
    compiled = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    convs = sum(isinstance(m, SmallMapConv2d) for m in tiny.modules())
    assert exported.count("Conv") == convs
    assert not any("unfold" in target or "matmul" in target for target in compiled)


def test_an_empty_batch_runs_in_eval_mode_as_nn_conv2d_does():
    model = trained_like(create_model(tiny_spec(), num_classes=10)).eval()
    with torch.no_grad():
        assert model(torch.zeros(0, 3, 64, 64)).shape == (0, 10)
