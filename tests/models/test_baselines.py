import sys
import types

import pytest
import torch

from selecsls import count_params
from selecsls.models.baselines import ResNet50, create_baseline, list_baselines, narrowed_widths, resnet50, vovnet39
from selecsls.models.card import ModelCard
from selecsls.models.validation import InvalidInput


def test_resnet50_has_torchvisions_parameter_count_and_keys():
    model = ResNet50()
    state = model.state_dict()
    assert count_params(model) == 25_557_032
    assert len(state) == 320  # torchvision's resnet50().state_dict() has 320 entries
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the 3x3 conv strides
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    assert state["fc.weight"].shape == (1000, 2048)


def test_vovnet39_has_the_published_parameter_count_and_keys():
    model = vovnet39()
    state = model.state_dict()
    assert count_params(model) == 22_600_296
    assert state["stem.stem_3/conv.weight"].shape == (128, 64, 3, 3)
    assert state["stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight"].shape == (128, 128, 3, 3)
    assert state["stage2.OSA2_1.concat.OSA2_1_concat/conv.weight"].shape == (256, 128 + 5 * 128, 1, 1)
    assert state["stage5.OSA5_2.layers.4.OSA5_2_4/norm.running_mean"].shape == (224,)
    assert state["classifier.weight"].shape == (1000, 1024)
    assert "stage5.OSA5_3.concat.OSA5_3_concat/conv.weight" not in state  # 1/1/2/2 modules per stage


@pytest.mark.parametrize("name", list_baselines())
def test_baselines_classify_odd_sizes_and_export(name):
    model = create_baseline(name, num_classes=7).eval()
    images = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        out = model(images)
        assert out.shape == (2, 7)
        torch.testing.assert_close(torch.export.export(model, (images,)).module()(images), out)


def test_resnet50_falls_back_when_torchvision_is_broken(monkeypatch):
    class BrokenModule(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setitem(sys.modules, "torchvision", BrokenModule("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", BrokenModule("torchvision.models"))
    assert type(resnet50()) is ResNet50


def test_unknown_baseline_names_the_choices():
    with pytest.raises(ValueError, match="resnet50, vovnet39"):
        create_baseline("resnet18")


def test_the_one_registry_builds_baselines_and_refuses_selecsls_only_options():
    import selecsls

    assert selecsls.list_models(baselines=True)[-2:] == ["resnet50", "vovnet39"]
    assert "resnet50" not in selecsls.list_models()
    for name in ("resnet50", "vovnet39"):
        model = selecsls.create_model(name, num_classes=7)
        assert (model.num_classes, model.pretrained_cfg["architecture"]) == (7, name)
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="baseline resnet50 .*drop features_only, output_stride"):
        selecsls.create_model("resnet50", features_only=True, output_stride=16)


def test_a_baseline_card_takes_only_widths_the_network_has():
    assert ModelCard("resnet50", widths=[["layer1.0.conv1", 8], ["conv1", 16]]).widths == (
        ("conv1", 16),
        ("layer1.0.conv1", 8),
    )
    with pytest.raises(InvalidInput, match="vovnet39 has no other widths; only \\['resnet50'\\] take them"):
        ModelCard("vovnet39", widths=(("conv1", 8),))
    with pytest.raises(InvalidInput, match="widths name a conv resnet50 does not have: 'layer9.0.conv1'"):
        ModelCard("resnet50", widths=(("layer9.0.conv1", 8),))
    with pytest.raises(InvalidInput, match="the width of conv1 must be"):
        ModelCard("resnet50", widths=(("conv1", 0),))
    with pytest.raises(InvalidInput, match="widths must be a list of 2 items"):
        ModelCard("resnet50", widths=(("conv1",),))
    assert narrowed_widths("resnet50", ResNet50.dense_widths()) is None
