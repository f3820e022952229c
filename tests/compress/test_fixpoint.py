"""Exact pruning to its fixpoint: one criterion for fused and unfused models, every kind of inactive
channel removed exactly, and pruning the result again removes nothing."""

import pytest
import torch

import selecsls
from selecsls import create_model, fuse
from selecsls.compress.fixpoint import REASONS
from selecsls.compress.pruning import prune
from selecsls.compress.sparsity import analyze_sparsity
from sparse_models import IMAGE, KINDS, batchnorms, every_kind, make_inactive, relative_error, tiny_spec, trained_like


def widths(model):
    return {name: cout for name, _, cout, _ in model.spec.conv_layers()}


def assert_same_outputs(reference, pruned):
    x = torch.randn(IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference.eval()(x), pruned.eval()(x)
    pairs = zip(expected, got, strict=True) if isinstance(expected, list) else [(expected, got)]
    for before, after in pairs:
        assert relative_error(before, after) <= 1e-4


def tiny(variant="selecsls42b", **kwargs):
    return trained_like(create_model(tiny_spec(variant), **{"num_classes": 10} | kwargs))


@pytest.mark.parametrize("features_only", [False, True], ids=["classifier", "features_only"])
@pytest.mark.parametrize("variant", selecsls.list_models())
def test_pruning_the_result_again_removes_nothing_fused_or_not(variant, features_only):
    model = every_kind(tiny(variant, features_only=features_only))
    fused = fuse(model)
    report, fused_report = analyze_sparsity(model), analyze_sparsity(fused)
    assert report.removed_channels > 0
    for name, kept in report.fixpoint.keep.items():  # the same channels, whichever form comes in
        assert torch.equal(kept, fused_report.fixpoint.keep[name]), name
    for pruned in (prune(model), prune(fused)):
        assert widths(pruned) == report.fixpoint.widths
        assert analyze_sparsity(pruned).removed_channels == 0
        assert widths(prune(pruned)) == widths(pruned)
        assert_same_outputs(model, pruned)


LAYERS = ["features.1.conv2", "features.3.conv4", "features.2.conv6", "head.0"]


@pytest.mark.parametrize("kind", ["gamma", "filter", "unread"])
def test_each_kind_of_inactive_channel_is_removed_exactly_and_reported(kind):
    model = make_inactive(tiny(), kind, {name: [0, 2] for name in LAYERS})
    report = analyze_sparsity(model)
    pruned = prune(model)
    for name in widths(model):
        expected = {reason: 2 if name in LAYERS and reason == kind else 0 for reason in REASONS}
        assert report.layer(name).removed == expected, name
        assert widths(pruned)[name] == widths(model)[name] - expected[kind], name
    assert_same_outputs(model, pruned)
    fused = analyze_sparsity(fuse(model)).removals()
    for name, removed in report.removals().items():  # without gamma, a zero-gamma channel is a zero filter
        assert fused[name] == removed | {"gamma": 0, "filter": removed["gamma"] + removed["filter"]}, name


def test_constant_channels_are_folded_only_where_every_reader_is_1x1():
    # conv1 and conv3 feed only 1x1 convs; conv2 feeds conv3 (3x3) and a block output the next conv1 (3x3).
    foldable, padded = ["features.1.conv1", "features.3.conv3", "head.3"], ["features.0.conv2", "features.1.conv6"]
    model = make_inactive(tiny(), "constant", {name: [0, 1] for name in foldable + padded})
    report, pruned = analyze_sparsity(model), prune(model)
    for name in foldable:
        assert report.layer(name).removed["constant"] == 2 and widths(pruned)[name] == widths(model)[name] - 2
    for name in padded:
        assert report.layer(name).kept == widths(pruned)[name] == widths(model)[name], name
    assert_same_outputs(model, pruned)


def test_a_layer_left_reading_only_removed_channels_goes_in_the_next_round():
    model = make_inactive(tiny(), "gamma", {"features.1.conv3": [0, 1]})
    conv4 = model.features[1].conv4
    with torch.no_grad():  # conv4's channel 0 reads only conv3's channels 0 and 1, and is zero without them
        conv4.conv.weight[0, 2:] = 0.0
        conv4.bn.running_mean[0], conv4.bn.bias[0] = 0.0, -0.3
    report = analyze_sparsity(model)
    assert report.fixpoint.rounds == 2
    assert report.layer("features.1.conv3").removed["gamma"] == 2
    assert report.layer("features.1.conv4").removed["filter"] == 1
    pruned = prune(model)
    assert analyze_sparsity(pruned).removed_channels == 0
    assert_same_outputs(model, pruned)


def test_a_dense_model_loses_nothing():
    for model in (tiny(), trained_like(create_model("selecsls42b", num_classes=10))):
        report = analyze_sparsity(model)
        assert report.removed_channels == 0 and report.fixpoint.rounds == 0
        assert widths(prune(model)) == widths(model)


def test_a_decayed_filter_under_a_live_gamma_is_caught_before_fusion():
    """The case that made the first pass stop short: |gamma| is large, the fused filter is ~0."""
    model = make_inactive(tiny(), "filter", {"features.2.conv1": [3]})
    layer = analyze_sparsity(model).layer("features.2.conv1")
    assert float(batchnorms(model)["features.2.conv1"].weight[3].detach()) >= 0.5
    assert bool(layer.low_scale[3]) and layer.removed["filter"] == 1


def test_the_criterion_is_the_fused_filter_norm_which_is_gamma_times_the_normalised_filter_norm():
    model = tiny()
    bn, conv = batchnorms(model)["features.1.conv2"], model.features[1].conv2.conv
    normalised = conv.weight.flatten(1).norm(dim=1) / (bn.running_var + bn.eps).sqrt()
    expected = bn.weight.abs() * normalised
    assert torch.allclose(analyze_sparsity(model).layer("features.1.conv2").scale, expected.detach(), rtol=1e-5)
    assert torch.allclose(analyze_sparsity(fuse(model)).layer("features.1.conv2").scale, expected.detach(), rtol=1e-5)


def test_every_kind_at_once_in_the_table():
    model = every_kind(tiny())
    table = analyze_sparsity(model).table()
    header, total = table.splitlines()[0], table.splitlines()[-1].split()
    for title in ["gamma~0", "filter~0", "const folded", "unread", "kept"]:
        assert title in header
    report = analyze_sparsity(model)
    counts = [sum(layer.removed[reason] for layer in report.layers) for reason in KINDS]
    assert all(counts) and [int(v) for v in total[3:7]] == counts
    assert int(total[-1]) == report.total_channels - report.removed_channels


def test_a_callers_analysis_is_reused_only_at_the_same_threshold():
    model = every_kind(trained_like(create_model(tiny_spec(), num_classes=10)))
    report = analyze_sparsity(model, 1e-3)
    assert prune(model, 1e-3, report=report).spec == prune(model, 1e-3).spec
    with pytest.raises(ValueError, match="same threshold"):
        prune(model, 1e-2, report=report)
