import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from selecsls import count_macs, count_params, create_model, fuse, save
from selecsls.compress.pruning import prune, prune_to_budget
from selecsls.compress.sparsity import analyze_sparsity
from sparse_models import (
    IMAGE,
    batchnorms,
    deactivate,
    relative_error,
    sparse_tiny_model,
    tiny_spec,
    trained_like,
)


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, list) else [out]


def assert_same_outputs(reference, pruned, x=None):
    x = torch.randn(IMAGE) if x is None else x
    for ref, out in zip(outputs(reference, x), outputs(pruned, x), strict=True):
        assert relative_error(ref, out) <= 1e-4


def widths(model):
    return {name: cout for name, _, cout, _ in model.spec.conv_layers()}


def conv_channels(model):
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def test_zero_gamma_channels_are_removed_exactly():
    model = sparse_tiny_model(0.3)
    before = copy.deepcopy(model.state_dict())
    pruned = prune(model)
    assert_same_outputs(model, pruned)
    assert conv_channels(pruned) == sum(int((bn.weight != 0).sum()) for bn in batchnorms(model).values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pruned.modules()) and pruned.fused
    assert type(pruned) is type(model) and pruned.spec.name == "tiny42b_pruned"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model must not change"
    assert count_params(pruned) < count_params(fuse(model))


def test_constant_channels_feeding_1x1_convs_are_folded_into_biases():
    model = trained_like(create_model(tiny_spec(), num_classes=10))
    # conv1/conv3 feed 1x1 convs (conv2/conv4 and conv6), conv5 feeds conv6, head.2 feeds head.3 (1x1),
    # head.3 feeds the classifier after pooling.
    layers = ["features.1.conv1", "features.3.conv3", "features.0.conv5", "head.2", "head.3"]
    deactivate(model, {name: [0, 2] for name in layers}, beta=0.7)
    pruned = prune(model)
    assert_same_outputs(model, pruned)
    for name in layers:
        assert widths(pruned)[name] == widths(model)[name] - 2, name


@pytest.mark.parametrize("global_pool", ["avg", "max"])
def test_constant_channels_folded_into_classifier_for_either_pooling(global_pool):
    model = deactivate(
        trained_like(create_model(tiny_spec(), num_classes=10, global_pool=global_pool)), {"head.3": [1]}, 0.5
    )
    pruned = prune(model)
    assert widths(pruned)["head.3"] == widths(model)["head.3"] - 1
    assert_same_outputs(model, pruned)


def test_constant_channels_feeding_3x3_convs_are_kept():
    model = trained_like(create_model(tiny_spec(), num_classes=10))
    # conv2 feeds conv3 (3x3); a block output feeds the next conv1 (3x3); the stage's first
    # block output also feeds later conv6s (1x1), but one 3x3 reader is enough to keep it.
    layers = ["features.0.conv2", "features.1.conv6", "features.2.conv6", "stem"]
    constant = deactivate(copy.deepcopy(model), {name: [0] for name in layers}, beta=0.7)
    zero = deactivate(copy.deepcopy(model), {name: [0] for name in layers}, beta=0.0)
    kept, removed = prune(constant), prune(zero)
    assert_same_outputs(constant, kept)
    assert_same_outputs(zero, removed)
    for name in layers:
        assert widths(kept)[name] == widths(model)[name], name
        assert widths(removed)[name] == widths(model)[name] - 1, name


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_layer_with_all_channels_inactive_keeps_one(beta):
    model = trained_like(create_model(tiny_spec(), num_classes=10))
    everything = {name: list(range(widths(model)[name])) for name in ["features.1.conv1", "features.3.conv3"]}
    deactivate(model, everything, beta=beta)
    pruned = prune(model)
    assert widths(pruned)["features.1.conv1"] == 1 and widths(pruned)["features.3.conv3"] == 1
    assert_same_outputs(model, pruned)


def test_pruning_a_pruned_model_again():
    model = sparse_tiny_model(0.3)
    once = prune(model)
    twice = prune(once)
    assert widths(twice) == widths(once)
    assert_same_outputs(model, twice)
    # A fused model has no gamma: a zero fused filter (weight and bias) marks the channel inactive.
    with torch.no_grad():
        once.features[2].conv3.conv.weight[0] = 0.0
        once.features[2].conv3.conv.bias[0] = 0.0
    again = prune(once)
    assert widths(again)["features.2.conv3"] == widths(once)["features.2.conv3"] - 1
    assert_same_outputs(once, again)


def test_calibration_loader_removes_channels_that_never_fire():
    model = sparse_tiny_model(0.3)
    with torch.no_grad():
        model.features[2].conv2.bn.bias[1] = -100.0  # gamma active, output always 0 after ReLU
    x = torch.randn(IMAGE)
    layer = analyze_sparsity(model, loader=[x]).layer("features.2.conv2")
    assert bool(layer.dead[1]) and not bool(layer.low_scale[1])
    pruned = prune(model, loader=[x])
    assert widths(pruned)["features.2.conv2"] == layer.channels - int(layer.inactive.sum())
    assert widths(prune(model))["features.2.conv2"] == layer.channels - int(layer.low_scale.sum())
    assert_same_outputs(model, pruned, x)


def test_features_only_keeps_returned_feature_widths():
    model = sparse_tiny_model(0.3, features_only=True)
    pruned = prune(model)
    assert [i["num_chs"] for i in pruned.feature_info] == [i["num_chs"] for i in model.feature_info]
    assert conv_channels(pruned) < conv_channels(model)
    assert_same_outputs(model, pruned)


def test_classifierless_model_keeps_its_output_width():
    model = sparse_tiny_model(0.3, num_classes=0)
    pruned = prune(model)
    assert pruned.num_features == model.num_features
    assert_same_outputs(model, pruned)


@pytest.mark.parametrize(
    "budget,calibrated",
    [(dict(macs=0.7), False), (dict(macs=0.4), False), (dict(params=0.5), False), (dict(macs=0.4), True)],
    ids=["macs", "macs-small", "params", "macs-activation-importance"],
)
def test_prune_to_budget_reaches_the_target(budget, calibrated):
    model = sparse_tiny_model(0.1)
    size = (1, 3, 64, 64)
    loader = [torch.randn(IMAGE)] if calibrated else None
    pruned = prune_to_budget(model, input_size=size, loader=loader, **budget)
    ((metric, fraction),) = budget.items()
    if metric == "macs":
        achieved = count_macs(pruned, size) / count_macs(model, size)
    else:
        achieved = count_params(pruned) / count_params(fuse(model))
    assert achieved <= fraction and achieved == pytest.approx(fraction, rel=0.02)
    assert pruned.fused and pruned(torch.randn(IMAGE)).shape == (2, 10)


def test_prune_to_budget_below_free_pruning_returns_the_exact_pruning():
    model = sparse_tiny_model(0.5)
    assert widths(prune_to_budget(model, macs=0.99, input_size=(1, 3, 64, 64))) == widths(prune(model))


def test_prune_to_budget_errors():
    model = sparse_tiny_model(0.1)
    with pytest.raises(ValueError, match="exactly one budget"):
        prune_to_budget(model)
    with pytest.raises(ValueError, match="exactly one budget"):
        prune_to_budget(model, macs=0.5, params=0.5)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        prune_to_budget(model, macs=1.5)
    with pytest.raises(ValueError, match="ask for a larger fraction"):
        prune_to_budget(model, params=1e-4)


def test_rejects_other_modules():
    with pytest.raises(TypeError, match="SelecSLS model"):
        prune(nn.Linear(2, 2))


RELOAD_SCRIPT = """
import sys
import torch
import selecsls

path, data_path, out_path = sys.argv[1:]
x = torch.load(data_path)
model = selecsls.load(path).eval()
features = selecsls.load(path, features_only=True).eval()
with torch.no_grad():
    torch.save(
        {
            "name": model.spec.name,
            "logits": model(x),
            "exported": torch.export.export(model, (x,)).module()(x),
            "features": features(x),
        },
        out_path,
    )
"""


def test_pruned_model_round_trips_through_save_and_load_in_a_fresh_process(tmp_path):
    pruned = prune(sparse_tiny_model(0.3)).eval()
    x = torch.randn(IMAGE)
    save(pruned, tmp_path / "pruned.pt")
    torch.save(x, tmp_path / "x.pt")
    args = [str(tmp_path / name) for name in ("pruned.pt", "x.pt", "out.pt")]
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, *args], check=True, timeout=120)
    result = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = pruned(x)
        assert result["name"] == pruned.spec.name
        assert (
            relative_error(expected, result["logits"]) <= 1e-6 and relative_error(expected, result["exported"]) <= 1e-5
        )
        assert [f.shape[1] for f in result["features"]] == [info["num_chs"] for info in pruned.feature_info]
        assert relative_error(expected, pruned.fc(result["features"][-1].mean((2, 3)))) <= 1e-5
