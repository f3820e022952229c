import pytest
import torch
from torch import nn

from selecsls import create_model, fuse


def randomize_bn(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


@pytest.mark.parametrize("features_only", [False, True])
def test_fuse_keeps_outputs_and_removes_bn(features_only):
    model = randomize_bn(create_model("selecsls42b", num_classes=10, features_only=features_only)).eval()
    fused = fuse(model)
    assert fused.fused and not model.fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "input model must not change"
    x = torch.randn(2, 3, 97, 64)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    refs, outs = (ref, out) if features_only else ([ref], [out])
    for r, o in zip(refs, outs):
        assert (r - o).abs().max() <= 1e-4 * r.abs().max()
    assert type(fused) is type(model)


def test_fuse_rejects_other_modules():
    with pytest.raises(TypeError, match="SelecSLS model"):
        fuse(nn.Linear(2, 2))
