import sys

import pytest
import torch

import selecsls
from selecsls import MissingDependency
from selecsls.cli import main
from selecsls.compress.baseline_pruning import prune_to_macs
from selecsls.models.baselines import ResNet50, conv_widths
from selecsls.models.complexity import count_macs
from training_fixtures import make_image_folder

SIZE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def trained_looking_resnet50():
    torch.manual_seed(0)
    model = ResNet50(num_classes=10)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.0, 1.0)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("importance", ["bn_scale", "magnitude"])
def test_torch_pruning_brings_a_small_resnet50_to_a_mac_budget(trained_looking_resnet50, importance):
    pytest.importorskip("torch_pruning")
    dense = count_macs(trained_looking_resnet50, SIZE)
    before = {k: v.clone() for k, v in trained_looking_resnet50.state_dict().items()}
    pruned = prune_to_macs(trained_looking_resnet50, dense // 2, SIZE, importance, tolerance=0.05)
    assert 0.95 * dense // 2 <= count_macs(pruned, SIZE) <= dense // 2
    # The residual additions keep one width per stage; the classifier keeps its 10 outputs.
    widths = conv_widths(pruned)
    for stage, blocks in zip(("layer1", "layer2", "layer3", "layer4"), ResNet50.STAGE_BLOCKS):
        tied = {widths[f"{stage}.{b}.conv3"] for b in range(blocks)} | {widths[f"{stage}.0.downsample.0"]}
        assert len(tied) == 1 and tied.pop() < ResNet50.dense_widths()[f"{stage}.0.conv3"]
    assert pruned.fc.out_features == 10
    # Described by its widths: the same class rebuilds it and takes its weights.
    ResNet50(10, widths).load_state_dict(pruned.state_dict())
    # The source is untouched, and the pruned network trains.
    assert all(torch.equal(v, before[k]) for k, v in trained_looking_resnet50.state_dict().items())
    pruned.train()
    loss = torch.nn.functional.cross_entropy(pruned(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in pruned.parameters())


def test_bad_requests_are_one_clear_error(trained_looking_resnet50):
    with pytest.raises(ValueError, match="importance must be one of"):
        prune_to_macs(trained_looking_resnet50, 10**6, SIZE, importance="taylor")
    with pytest.raises(ValueError, match="target_macs must be between 0 and the dense model's"):
        prune_to_macs(trained_looking_resnet50, 10**12, SIZE)
    with pytest.raises(TypeError, match="prunes a ResNet-50"):
        prune_to_macs(torch.nn.Linear(2, 2), 1, SIZE)


def test_without_torch_pruning_the_baseline_names_the_extra(trained_looking_resnet50, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # how an absent package looks to import
    dense = count_macs(trained_looking_resnet50, SIZE)
    with pytest.raises(
        MissingDependency, match=r"torch_pruning is needed for the Torch-Pruning baseline; .*selecsls\[baseline\]"
    ):
        prune_to_macs(trained_looking_resnet50, dense // 2, SIZE)


def test_resnet50_widths_are_checked():
    with pytest.raises(ValueError, match="residual additions of layer2 need one width"):
        ResNet50(10, {"layer2.1.conv3": 100})
    with pytest.raises(ValueError, match="widths name convs the network does not have"):
        ResNet50(10, {"layer9.0.conv1": 3})
    with pytest.raises(ValueError, match="widths must be positive integers"):
        ResNet50(10, {"conv1": 0})
    assert conv_widths(ResNet50(10)) == ResNet50.dense_widths()


def test_a_pruned_resnet50_saves_loads_and_fine_tunes_as_a_baseline(tmp_path):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    resnet = selecsls.create_model("resnet50", num_classes=3).eval()  # the classes of the fine-tuning data
    pruned = prune_to_macs(resnet, count_macs(resnet, SIZE) // 3, SIZE, tolerance=0.1).eval()
    assert dict(pruned.card.widths) == {
        name: width for name, width in conv_widths(pruned).items() if width != ResNet50.dense_widths()[name]
    }
    image = torch.randn(2, 3, 32, 32)
    for suffix in (".pt", ".safetensors"):
        selecsls.save(pruned, tmp_path / f"pruned{suffix}")
        loaded = selecsls.load(tmp_path / f"pruned{suffix}").eval()  # widths read off the weights
        assert loaded.card == pruned.card and torch.equal(loaded(image), pruned(image))
    data = make_image_folder(tmp_path / "data", per_class=4)
    argv = ["train", "--data", str(data), "--init", str(tmp_path / "pruned.pt"), "--output", str(tmp_path / "ft")]
    argv += ["--img-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    assert conv_widths(selecsls.load(tmp_path / "ft" / "best.pt")) == conv_widths(pruned)
