"""SmallMapConv2d: the training-time matrix product on tiny maps is the conv, exactly."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from selecsls import create_model, list_models
from selecsls.models.conv import SmallMapConv2d


def _geometries():
    for size, kernel, stride, dilation in itertools.product([1, 2, 3, 5], [1, 2, 3, 5], [1, 2, 3], [1, 2]):
        for padding in sorted({0, dilation * (kernel - 1) // 2, dilation * (kernel - 1), dilation * kernel}):
            if size + 2 * padding >= dilation * (kernel - 1) + 1:
                yield size, kernel, stride, padding, dilation


@pytest.mark.parametrize("bias", [False, True])
def test_every_geometry_matches_the_conv_in_float64(monkeypatch, bias):
    """Any kernel/stride/padding/dilation on maps of 1-5 pixels (non-square too): outputs and all
    gradients equal F.conv2d's; skipped taps get exactly zero gradient."""
    monkeypatch.setattr(SmallMapConv2d, "gemm_max_output_pixels", 10**6)  # every case takes the product
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)
    torch.manual_seed(0)
    cases = 0
    for size, kernel, stride, padding, dilation in _geometries():
        conv = SmallMapConv2d(3, 4, kernel, stride, padding, dilation=dilation, bias=bias).double().train()
        x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, requires_grad=True)
        params = [x, conv.weight] + ([conv.bias] if bias else [])
        reference = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation)
        out = conv(x)
        assert out.shape == reference.shape
        weights = torch.randn_like(reference)
        expected = torch.autograd.grad((reference * weights).sum(), params)
        got = torch.autograd.grad((out * weights).sum(), params)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        cases += 1
    assert cases > 250


def test_a_3x3_conv_on_a_1x1_map_uses_the_centre_tap_only(monkeypatch):
    monkeypatch.setattr(SmallMapConv2d, "gemm_min_weight_elements", 0)
    conv = SmallMapConv2d(8, 5, 3, 1, 1).train()
    x = torch.randn(4, 8, 1, 1)
    conv(x).sum().backward()
    grad = conv.weight.grad
    assert grad[:, :, 1, 1].abs().min() > 0
    grad[:, :, 1, 1] = 0
    assert torch.count_nonzero(grad) == 0


def _output_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", [32, 64])
def test_every_variant_trains_and_evaluates_as_the_plain_conv_network(monkeypatch, name, size):
    """Whole networks at 32 and 64 px, train and eval mode: outputs and every gradient equal the
    network built from plain convs, the head really takes the product (in eval too: its maps are
    small), and the state dict is the plain network's. In float64, so the check is far below 1e-5
    (measured 1e-14): in float32, batch statistics over a few 1x1 maps amplify any reordering of the
    sums (measured 5e-6 at batch 8)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).double()
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    products = []
    monkeypatch.setattr(SmallMapConv2d, "_gemm_forward", _counting(SmallMapConv2d._gemm_forward, products))
    for train in (True, False):
        model.train(train)
        with monkeypatch.context() as plain:
            plain.setattr(SmallMapConv2d, "gemm_max_output_pixels", 0)
            plain.setattr(SmallMapConv2d, "gemm_max_eval_positions", 0)
            expected_out, expected_grads = _output_and_grads(model, x)
        assert not products
        out, grads = _output_and_grads(model, x)
        assert _relative(out, expected_out) < 1e-10
        for key, grad in grads.items():
            assert _relative(grad, expected_grads[key]) < 1e-10, key
        assert products  # the head's large convs on 1x1-2x2 maps
        assert all(conv.weight.numel() >= 2**20 for conv in products)  # small weights stay convs
        products.clear()
    plain_keys = {k: v.shape for k, v in create_model(name, num_classes=10).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == plain_keys
    assert all(set(m.state_dict()) <= {"weight", "bias"} for m in model.modules() if isinstance(m, SmallMapConv2d))


def _counting(method, calls):
    def wrapper(self, *args):
        calls.append(self)
        return method(self, *args)

    return wrapper


def test_224_px_training_never_takes_the_product(monkeypatch):
    products = []
    monkeypatch.setattr(SmallMapConv2d, "_gemm_forward", _counting(SmallMapConv2d._gemm_forward, products))
    create_model("selecsls42b", num_classes=3).train()(torch.randn(1, 3, 224, 224))
    assert products == []
