import pytest
import torch

import selecsls
from selecsls import count_params, create_model

PUBLISHED_PARAMS = {
    "selecsls42": 30_354_952,
    "selecsls42b": 32_458_248,
    "selecsls60": 30_670_768,
    "selecsls60b": 32_774_064,
    "selecsls84": 40_468_840,
    "selecsls102": 40_456_200,
}


@pytest.mark.parametrize("name,params", sorted(PUBLISHED_PARAMS.items()))
def test_exact_parameter_counts(name, params):
    assert count_params(create_model(name)) == params


def test_parameter_count_other_classes_and_channels():
    base = PUBLISHED_PARAMS["selecsls60"]
    # classifier: 1280*c + c; stem conv: 3x3 x 32 per input channel.
    m = create_model("selecsls60", num_classes=10, in_chans=1)
    assert count_params(m) == base - 1281 * 990 - 2 * 9 * 32
    assert count_params(create_model("selecsls60", num_classes=0)) == base - 1281 * 1000


def test_list_models():
    assert selecsls.list_models() == sorted(PUBLISHED_PARAMS)
    assert selecsls.list_models("*60*") == ["selecsls60", "selecsls60b"]


def test_forward_odd_sizes_and_tiny_input():
    m = create_model("selecsls42b", num_classes=7).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 225, 301)).shape == (2, 7)
        assert m(torch.randn(1, 3, 32, 33)).shape == (1, 7)


def test_forward_head_pre_logits_and_reset_classifier():
    m = create_model("selecsls42b").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape[1] == m.num_features == 1024
        assert m.forward_head(feats, pre_logits=True).shape == (1, 1024)
    m.reset_classifier(5)
    assert m(x).shape == (1, 5)
    m.reset_classifier(0, global_pool="")
    assert m(x).dim() == 4


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="output_stride must be"):
        create_model("selecsls60", output_stride=4)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        create_model("selecsls60", global_pool="")
    with pytest.raises(ValueError, match="out_indices"):
        create_model("selecsls60", features_only=True, out_indices=(9,))


def test_features_at_odd_size():
    m = create_model("selecsls60", features_only=True).eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 225, 301))
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(32, 113, 151), (128, 57, 76), (288, 29, 38), (416, 15, 19), (1024, 8, 10), (1280, 4, 5)]
    assert [i["reduction"] for i in m.feature_info] == [2, 4, 8, 16, 32, 64]
    assert [i["num_chs"] for i in m.feature_info] == [s[0] for s in shapes]


@pytest.mark.parametrize("output_stride,expected", [(16, (15, 19)), (8, (29, 38))])
def test_output_stride_dilates(output_stride, expected):
    m = create_model("selecsls42b", features_only=True, output_stride=output_stride, out_indices=(3, 4, 5)).eval()
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 225, 301))
    assert [tuple(f.shape[2:]) for f in feats] == [expected] * 3
    assert [i["reduction"] for i in m.feature_info] == [min(16, output_stride), output_stride, output_stride]


def test_grad_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(0)
    m = create_model("selecsls42b", num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters()]

    torch.manual_seed(1)
    ref_out, ref_grads = run()
    m.set_grad_checkpointing(True)
    torch.manual_seed(1)
    out, grads = run()
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_torch_export_round_trip(tmp_path):
    """torch.export (what the ONNX and AOTInductor exports build on) captures the classifier and the backbone."""
    m = create_model("selecsls42b", num_classes=10).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = m(x)
        path = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(m, (x,)), path)
        torch.testing.assert_close(torch.export.load(path).module()(x), ref)
        feats = torch.export.export(create_model("selecsls42b", features_only=True).eval(), (x,)).module()(x)
        assert len(feats) == 6


def test_torch_compile_runs():
    m = create_model("selecsls42b", num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(
        m, backend="eager"
    )  # the inductor backend needs a C++ toolchain; graph capture is what we test
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x))


def test_create_model_keeps_spec_in_chans_unless_overridden():
    spec = selecsls.get_spec("selecsls42b").with_in_chans(1)
    assert create_model(spec).in_chans == 1
    assert create_model(spec, in_chans=4).in_chans == 4


@pytest.mark.parametrize("fused", [False, True])
def test_conv6_equals_a_1x1_conv_of_the_concatenation_in_values_and_gradients(fused):
    from selecsls.models.network import ConcatConvNormAct, ConvNormAct

    torch.manual_seed(0)
    parts = [torch.randn(2, c, 9, 7, requires_grad=True) for c in (5, 3, 2, 6)]
    mixer = ConcatConvNormAct([5, 3, 2, 6], 8, fused=fused)
    plain = ConvNormAct(16, 8, 1, fused=fused)
    plain.load_state_dict(mixer.state_dict())  # same keys: checkpoints fit either
    (mixer(parts) ** 2).sum().backward()
    expected_grads = [p.grad.clone() for p in parts] + [mixer.conv.weight.grad]
    for p in parts:
        p.grad = None
    expected = plain(torch.cat(parts, 1))
    (expected**2).sum().backward()
    torch.testing.assert_close(mixer(parts), expected)
    for got, want in zip(expected_grads, [p.grad for p in parts] + [plain.conv.weight.grad]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float sums in another order


def test_conv6_in_eval_mode_is_the_conv_of_the_concatenation():
    from selecsls.models.network import ConcatConvNormAct

    torch.manual_seed(0)
    parts = [torch.randn(2, c, 5, 5) for c in (4, 2, 2)]
    mixer = ConcatConvNormAct([4, 2, 2], 3, fused=True).eval()  # no BN: train mode computes the same function
    with torch.no_grad():
        expected = mixer.act(mixer.bn(mixer.conv(torch.cat(parts, 1))))
        torch.testing.assert_close(mixer(parts), expected, rtol=0, atol=0)
        mixer.train()
        torch.testing.assert_close(mixer(parts), expected, rtol=1e-4, atol=1e-4)  # same function, copy-free form
