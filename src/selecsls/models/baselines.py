"""Reference networks SelecSLS is measured against, with their published module layouts.

Module names (hence state-dict keys) match the published code, so published ImageNet
weights load with ``model.load_state_dict`` unchanged:

- ``resnet50``: torchvision's ResNet-50 (v1.5: stride on the 3x3 conv), 25,557,032 parameters.
  torchvision's own model is used whenever torchvision imports; this copy is the fallback.
- ``vovnet39``: VoVNet-39 from "An Energy and GPU-Computation Efficient Backbone Network"
  (Lee et al. 2019), the One-Shot-Aggregation network the SelecSLS paper compares against,
  laid out as in the authors' VoVNet.pytorch release (keys like
  ``stage2.OSA2_1.layers.0.OSA2_1_0/conv.weight``), 22,600,296 parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["BASELINES", "ResNet50", "VoVNet", "create_baseline", "list_baselines", "resnet50", "vovnet39"]


# ---------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, plus the (projected) input."""

    expansion = 4

    def __init__(self, in_chs: int, mid_chs: int, stride: int = 1) -> None:
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's module names: conv1, bn1, layer1..layer4, fc."""

    STAGE_BLOCKS = (3, 4, 6, 3)
    STAGE_WIDTHS = (64, 128, 256, 512)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs = 64
        for index, (blocks, width) in enumerate(zip(self.STAGE_BLOCKS, self.STAGE_WIDTHS)):
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_chs, width, stride if block == 0 else 1))
                in_chs = width * Bottleneck.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 when torchvision imports (any failure falls back), else :class:`ResNet50`."""
    try:
        from torchvision.models import resnet50 as torchvision_resnet50
    except Exception:  # a missing or broken torchvision install must never stop a benchmark
        return ResNet50(num_classes)
    return torchvision_resnet50(weights=None, num_classes=num_classes)


# ------------------------------------------------------------------------------- VoVNet-39
def _conv_bn_relu(
    prefix: str, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1
) -> list[tuple[str, nn.Module]]:
    """The released code's named triple ``{prefix}/conv``, ``{prefix}/norm``, ``{prefix}/relu``."""
    return [
        (f"{prefix}/conv", nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)),
        (f"{prefix}/norm", nn.BatchNorm2d(out_chs)),
        (f"{prefix}/relu", nn.ReLU(inplace=True)),
    ]


class OSAModule(nn.Module):
    """One-Shot Aggregation: a chain of 3x3 convs whose outputs (and the input) are concatenated
    once and mixed by a 1x1 conv. Modules after a stage's first add their input back
    (``identity``), as in the released VoVNet code; this adds no parameters."""

    def __init__(self, name: str, in_chs: int, stage_chs: int, concat_chs: int, layers: int, identity: bool) -> None:
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList(
            nn.Sequential(OrderedDict(_conv_bn_relu(f"{name}_{i}", in_chs if i == 0 else stage_chs, stage_chs, 3)))
            for i in range(layers)
        )
        self.concat = nn.Sequential(
            OrderedDict(_conv_bn_relu(f"{name}_concat", in_chs + layers * stage_chs, concat_chs, 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for layer in self.layers:
            outputs.append(layer(outputs[-1]))
        out = self.concat(torch.cat(outputs, 1))
        return out + x if self.identity else out


class VoVNet(nn.Module):
    """VoVNet: 3-conv stem (stride 4), four OSA stages (``stage2``..``stage5``, as published)
    separated by 3x3/2 ceil-mode max-pools; each per-stage tuple has four entries."""

    def __init__(
        self,
        stage_chs: tuple[int, ...],
        concat_chs: tuple[int, ...],
        modules_per_stage: tuple[int, ...],
        layers_per_module: int,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if not len(stage_chs) == len(concat_chs) == len(modules_per_stage) == 4:
            raise ValueError(
                "VoVNet has four stages: stage_chs, concat_chs and modules_per_stage need 4 entries each, "
                f"got {len(stage_chs)}, {len(concat_chs)} and {len(modules_per_stage)}"
            )
        self.stem = nn.Sequential(
            OrderedDict(
                _conv_bn_relu("stem_1", 3, 64, 3, 2)
                + _conv_bn_relu("stem_2", 64, 64, 3)
                + _conv_bn_relu("stem_3", 64, 128, 3, 2)
            )
        )
        in_chs = 128
        for index, (stage_ch, concat_ch, modules) in enumerate(zip(stage_chs, concat_chs, modules_per_stage)):
            number = index + 2
            stage = nn.Sequential()
            if index > 0:
                stage.add_module("Pooling", nn.MaxPool2d(3, 2, ceil_mode=True))
            for m in range(modules):
                name = f"OSA{number}_{m + 1}"
                stage.add_module(name, OSAModule(name, in_chs, stage_ch, concat_ch, layers_per_module, identity=m > 0))
                in_chs = concat_ch
            self.add_module(f"stage{number}", stage)
        self.classifier = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage5(self.stage4(self.stage3(self.stage2(self.stem(x)))))
        return self.classifier(x.mean((2, 3)))


def vovnet39(num_classes: int = 1000) -> VoVNet:
    """VoVNet-39: stage widths 128/160/192/224, outputs 256/512/768/1024, 1/1/2/2 modules of 5 convs."""
    return VoVNet((128, 160, 192, 224), (256, 512, 768, 1024), (1, 1, 2, 2), 5, num_classes)


# -------------------------------------------------------------------------------- registry
BASELINES: dict[str, Callable[..., nn.Module]] = {"resnet50": resnet50, "vovnet39": vovnet39}


def list_baselines() -> list[str]:
    return sorted(BASELINES)


def create_baseline(name: str, num_classes: int = 1000) -> nn.Module:
    """A baseline network by name, randomly initialised."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(list_baselines())}")
    return BASELINES[name](num_classes=num_classes)
