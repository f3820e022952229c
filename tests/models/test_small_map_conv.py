"""The tiny-map training path of SmallMapConv2d is exact: same outputs, gradients and BN statistics
as the plain convolution, for every variant, at the sizes where the head runs on 1x1 and 2x2 maps."""

import copy

import pytest
import torch
from torch import nn

from selecsls import create_model, list_models
from selecsls.models.network import SmallMapConv2d


def _plain(model: nn.Module) -> nn.Module:
    """A copy whose convs are ordinary ``nn.Conv2d`` (class swap only: same weights)."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if type(module) is SmallMapConv2d:
            module.__class__ = nn.Conv2d
    return reference


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list_models())
def test_training_outputs_and_gradients_equal_the_plain_convolution(name, size, monkeypatch):
    # float64: float32 rounding alone moves near-cancelling BN gradients by more than 1e-5 in
    # either implementation, so exactness is checked where rounding is negligible.
    dense_maps = []
    dense_forward = SmallMapConv2d._dense_forward
    monkeypatch.setattr(
        SmallMapConv2d, "_dense_forward", lambda self, x: dense_maps.append(x.shape[-2:]) or dense_forward(self, x)
    )
    model = create_model(name, num_classes=10).double().train()
    reference = _plain(model)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    outputs = [m(images) for m in (model, reference)]
    for out in outputs:
        out.square().sum().backward()
    assert dense_maps, "the tiny-map path was not taken"
    assert _relative(outputs[0], outputs[1]) <= 1e-5
    grads = dict(model.named_parameters())
    for key, param in reference.named_parameters():
        assert _relative(grads[key].grad, param.grad) <= 1e-5, key
    for (key, buffer), ref in zip(model.named_buffers(), reference.buffers()):  # BN running statistics
        assert _relative(buffer.double(), ref.double()) <= 1e-5, key
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_eval_mode_and_larger_maps_run_the_plain_convolution(monkeypatch):
    model = create_model("selecsls42b", num_classes=10)
    calls = []
    monkeypatch.setattr(SmallMapConv2d, "_dense_forward", lambda self, x: calls.append(x.shape) or 1 / 0)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
        model.train()(torch.randn(2, 3, 256, 256))  # every map the head sees is larger than 3x3
    assert calls == []


@pytest.mark.parametrize(("stride", "dilation", "size"), [(1, 1, 1), (2, 1, 2), (1, 1, 2), (2, 1, 3), (1, 2, 2)])
def test_dense_path_matches_conv2d_for_strides_dilations_and_sizes(stride, dilation, size):
    conv = SmallMapConv2d(5, 7, 3, stride, dilation, dilation=dilation, bias=True).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64, requires_grad=True)
    dense, plain = conv._dense_forward(x), conv._conv_forward(x, conv.weight, conv.bias)
    torch.testing.assert_close(dense, plain)
    grads = torch.autograd.grad(dense.sum(), (x, conv.weight, conv.bias))
    expected = torch.autograd.grad(plain.sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
