"""Issue 28's fair test: inactive against removable channels, by the package's pruning and by Torch-Pruning."""

import json

import pytest
import torch
from fair_test import dependency_graph_removal, removal_figure, selecsls_removal, summary
from torch import nn

from sparse_models import sparse_tiny_model, tiny_spec

pytest.importorskip("torch_pruning")


class _Block(nn.Module):
    """A residual block: its last BN's channels are tied to the block's input by the addition."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, inner, 1, bias=False), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = nn.Conv2d(inner, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8, 6), _Block(8, 6))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _inactive(bn: nn.BatchNorm2d, *channels: int) -> None:
    with torch.no_grad():
        bn.weight[list(channels)] = 0.0
        bn.bias[list(channels)] = 0.0  # output zero: removing it is exact


def _model() -> _TinyResNet:
    model = _TinyResNet().eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


def test_a_residual_tied_channel_goes_only_when_every_member_is_inactive():
    model = _model()
    tied = (model.bn1, model.layer1[0].bn2, model.layer1[1].bn2)  # one stage: the additions tie these
    _inactive(model.bn1, 2)  # one member of the group only: stays
    _inactive(model.layer1[1].bn2, 2, 5)
    for bn in tied:
        _inactive(bn, 3)  # every member: goes, from all three
    _inactive(model.layer1[0].bn1, 0)  # inside a block, tied to nothing: goes
    example = torch.randn(2, 3, 16, 16)
    stages, pruned = dependency_graph_removal(model, example, keep=("fc",))

    assert stages["stem"] == dict(channels=8, inactive=2, removable=1)
    assert stages["layer1"] == dict(channels=6 + 8 + 6 + 8, inactive=1 + 1 + 3, removable=1 + 1 + 1)
    assert [m.num_features for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)] == [7, 5, 7, 6, 7]
    assert model.bn1.num_features == 8 and pruned.fc.out_features == 4  # the input model is kept; so is the classifier
    found = summary(model, pruned, stages, (1, 3, 16, 16))
    assert (found["gamma_below_1e_3"], found["removable_channels"]) == (7, 4)
    assert found["output_change"] < 1e-6 and found["macs_after"] < found["macs"]


def test_a_group_keeps_one_channel_when_all_are_inactive():
    model = _model()
    for bn in (model.bn1, model.layer1[0].bn2, model.layer1[1].bn2):
        _inactive(bn, *range(8))
    stages, pruned = dependency_graph_removal(model, torch.randn(1, 3, 8, 8), keep=("fc",))
    assert pruned.bn1.num_features == 1 and stages["stem"]["removable"] == 7


def test_selecsls_removes_inactive_channels_on_their_own(tmp_path):
    model = sparse_tiny_model(0.3)
    stages, pruned = selecsls_removal(model, tiny_spec())
    inactive = sum(counts["inactive"] for counts in stages.values())
    removable = sum(counts["removable"] for counts in stages.values())
    assert inactive > 0 and removable == inactive  # gamma = beta = 0: every inactive channel goes
    assert pruned.output_change < 1e-4
    # an already pruned model counts against the dense spec: what went earlier counts as inactive and removed
    again, _ = selecsls_removal(pruned, tiny_spec())
    assert again == stages
    rows = [
        dict(model="tiny42b", recipe="sparsity", stages=stages, removable_channels=removable, gamma_below_1e_3=inactive)
    ]
    removal_figure(json.loads(json.dumps(rows)), tmp_path / "removal.png")
    assert (tmp_path / "removal.png").stat().st_size > 0
