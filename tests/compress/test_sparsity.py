import pytest
import torch

from selecsls import create_model, fuse
from selecsls.compress.sparsity import (
    SCALE_HISTOGRAM_LOG10_EDGES,
    analyze_sparsity,
    bn_scales,
    calibration_activations,
    save_scale_histogram,
    scale_statistics,
)
from sparse_models import IMAGE, deactivate, random_inactive, tiny_spec, trained_like


@pytest.fixture
def model_and_inactive():
    model = trained_like(create_model(tiny_spec(), num_classes=10))
    inactive = random_inactive(model, 0.3)
    return deactivate(model, inactive), inactive


def test_counts_channels_below_threshold_per_layer(model_and_inactive):
    model, inactive = model_and_inactive
    layer = model.features[1].conv2
    with torch.no_grad():  # a fused filter norm |gamma| * ||W|| / sqrt(var + eps) of 5e-4: below 1e-3, not zero
        layer.bn.weight[0] = 5e-4 * (layer.bn.running_var[0] + layer.bn.eps).sqrt() / layer.conv.weight[0].norm()
    report = analyze_sparsity(model)
    expected = {name: set(idx) for name, idx in inactive.items()}
    expected["features.1.conv2"].add(0)
    assert report.criterion == "fused filter norm" and not report.calibrated
    assert [layer.name for layer in report.layers] == [name for name, *_ in model.spec.conv_layers()]
    for layer in report.layers:
        assert set(layer.inactive.nonzero().flatten().tolist()) == expected[layer.name], layer.name
    assert report.inactive_channels == sum(len(v) for v in expected.values())
    assert report.layer("head.0").stage == "head" and report.layer("features.3.conv6").stage == "stage2"
    assert (
        int(analyze_sparsity(model, threshold=1e-4).layer("features.1.conv2").inactive.sum())
        == len(expected["features.1.conv2"]) - 1
    )


def test_fused_model_finds_the_same_channels(model_and_inactive):
    model, _ = model_and_inactive
    dense, fused = analyze_sparsity(model), analyze_sparsity(fuse(model))
    for a, b in zip(dense.layers, fused.layers):
        assert torch.equal(a.inactive, b.inactive) and a.kept == b.kept, a.name
        # importance is relative to the layer's mean and the same number before and after fusion
        assert torch.allclose(a.importance, b.importance, atol=1e-6) and float(a.importance.mean()) == pytest.approx(1)


def test_calibration_finds_channels_that_are_always_zero(model_and_inactive):
    model, _ = model_and_inactive
    with torch.no_grad():
        model.features[2].conv3.bn.bias[1] = -100.0  # active gamma, but ReLU always cuts it
    loader = [torch.randn(IMAGE), (torch.randn(IMAGE), torch.zeros(2))]
    report = analyze_sparsity(model, loader=loader)
    layer = report.layer("features.2.conv3")
    assert report.calibrated and bool(layer.dead[1]) and not bool(layer.low_scale[1])
    activation_mean = calibration_activations(model, loader)["features.2.conv2"][1]
    assert activation_mean.sum() > 0
    assert torch.allclose(report.layer("features.2.conv2").importance, activation_mean / activation_mean.mean())
    assert "dead on calib" in report.table() and "dead on calib" not in analyze_sparsity(model).table()


def test_table_lists_every_layer_and_totals(model_and_inactive):
    model, inactive = model_and_inactive  # gamma = beta = 0: every inactive channel is a zero output
    report = analyze_sparsity(model)
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(report.layers)
    assert lines[0].split()[-1] == "kept"
    removed = report.removed_channels
    assert removed == sum(len(v) for v in inactive.values()) == report.inactive_channels
    total = [
        "total",
        report.total_channels,
        report.inactive_channels,
        removed,
        0,
        0,
        0,
        report.total_channels - removed,
    ]
    assert lines[-1].split() == [str(v) for v in total]
    kept = {name: 1 for name, *_ in model.spec.conv_layers()}  # e.g. after pruning to a budget
    assert report.table(kept).splitlines()[-1].split()[-1] == str(len(kept))


def test_histogram_png(model_and_inactive, tmp_path):
    path = tmp_path / "gamma.png"
    save_scale_histogram(analyze_sparsity(model_and_inactive[0]), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "loader,match", [([], "no batches"), ([torch.zeros(3, 8, 8)], r"\(N, C, H, W\)"), (["x"], "image batches")]
)
def test_bad_calibration_loader(loader, match):
    with pytest.raises(ValueError, match=match):
        analyze_sparsity(create_model(tiny_spec()), loader=loader)


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        analyze_sparsity(create_model(tiny_spec()), threshold=-1)
    with pytest.raises(TypeError, match="SelecSLS model"):
        analyze_sparsity(torch.nn.Linear(2, 2))


def test_bn_scales_of_any_model_agree_with_the_per_layer_analysis(model_and_inactive):
    model, inactive = model_and_inactive
    report = analyze_sparsity(model)
    scales = bn_scales(model)
    assert scales.numel() == report.total_channels  # every BatchNorm of a SelecSLS sits in a conv layer
    assert int((scales < 1e-3).sum()) == report.inactive_channels == sum(len(v) for v in inactive.values())
    assert report.removals()["head.0"]["gamma"] == len(inactive["head.0"])
    assert bn_scales(fuse(model)).numel() == 0  # nothing to count without BatchNorm


def test_scale_statistics_count_fractions_extremes_and_a_fixed_log_histogram():
    scales = torch.tensor([0.0, 1e-7, 5e-4, 1e-3, 9e-3, 0.5, 1.0, 20.0])
    stats = scale_statistics(scales)
    assert stats["gamma_below_1e-3"] == 3 / 8 and stats["gamma_below_1e-2"] == 5 / 8
    assert stats["gamma_min"] == 0.0 and stats["gamma_median"] == pytest.approx(1e-3)
    histogram = stats["gamma_histogram"]
    assert histogram["log10_edges"] == list(SCALE_HISTOGRAM_LOG10_EDGES) == [k / 4 for k in range(-24, 5)]
    counts = histogram["counts"]
    assert len(counts) == 28 and sum(counts) == 8
    bin_of = {edge: i for i, edge in enumerate(SCALE_HISTOGRAM_LOG10_EDGES)}
    # 0 and 1e-7 fall in the first bin, 20 in the last; 1e-3 opens the bin [1e-3, 10^-2.75).
    assert counts[0] == 2 and counts[-1] == 1 and counts[bin_of[-3.0]] == 1 and counts[bin_of[0.0]] == 1
    assert scale_statistics(torch.empty(0)) == {}
