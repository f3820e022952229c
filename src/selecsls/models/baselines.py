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
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "BASELINES",
    "DENSE_WIDTHS",
    "ResNet50",
    "VoVNet",
    "conv_widths",
    "create_baseline",
    "list_baselines",
    "narrowed_widths",
    "resnet50",
    "vovnet39",
]


# ---------------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand, plus the (projected) input."""

    def __init__(self, in_chs: int, reduce_chs: int, mid_chs: int, out_chs: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, reduce_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(reduce_chs)
        self.conv2 = nn.Conv2d(reduce_chs, mid_chs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if project:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's module names: conv1, bn1, layer1..layer4, fc.

    ``widths`` (conv name -> output channels, as :func:`conv_widths` reads them off a model) narrows
    any conv: a channel-pruned ResNet-50 is this class with other widths. The residual additions tie
    the outputs of every block of a stage (``conv3`` and the projection), so those must agree.
    """

    STAGE_BLOCKS = (3, 4, 6, 3)
    STAGE_WIDTHS = (64, 128, 256, 512)
    EXPANSION = 4

    def __init__(self, num_classes: int = 1000, widths: Mapping[str, int] | None = None) -> None:
        super().__init__()
        width = _width_lookup(self.dense_widths(), widths)
        self.conv1 = nn.Conv2d(3, width("conv1"), 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width("conv1"))
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_chs = width("conv1")
        for index, blocks in enumerate(self.STAGE_BLOCKS):
            stride = 1 if index == 0 else 2
            stage = f"layer{index + 1}"
            out_chs = width(f"{stage}.0.conv3")
            layer = []
            for block in range(blocks):
                name = f"{stage}.{block}"
                for tied in (f"{name}.conv3", f"{name}.downsample.0") if block == 0 else (f"{name}.conv3",):
                    if width(tied) != out_chs:
                        raise ValueError(
                            f"ResNet-50 widths: {tied} has {width(tied)} channels but {stage}.0.conv3 has {out_chs}; "
                            f"the residual additions of {stage} need one width for all of them"
                        )
                reduce_chs, mid_chs = width(f"{name}.conv1"), width(f"{name}.conv2")
                layer.append(Bottleneck(in_chs, reduce_chs, mid_chs, out_chs, stride if block == 0 else 1, block == 0))
                in_chs = out_chs
            self.add_module(stage, nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def dense_widths(cls) -> dict[str, int]:
        """The published network's width of every conv, by module name."""
        widths = {"conv1": 64}
        for index, (blocks, mid) in enumerate(zip(cls.STAGE_BLOCKS, cls.STAGE_WIDTHS)):
            for block in range(blocks):
                name = f"layer{index + 1}.{block}"
                widths |= {f"{name}.conv1": mid, f"{name}.conv2": mid, f"{name}.conv3": mid * cls.EXPANSION}
                if block == 0:
                    widths[f"{name}.downsample.0"] = mid * cls.EXPANSION
        return widths

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def narrowed_widths(baseline: str, widths: Mapping[str, int]) -> tuple[tuple[str, int], ...] | None:
    """The ``widths`` (conv name -> channels) that differ from the published ``baseline``'s, as sorted
    pairs (a model card's ``widths``); None for the published widths or a baseline that has no others."""
    if baseline not in DENSE_WIDTHS:
        return None
    dense = DENSE_WIDTHS[baseline]()
    return tuple(sorted((name, width) for name, width in widths.items() if dense.get(name, width) != width)) or None


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv of ``model``, by module name: a network's widths as data."""
    return {name: module.out_channels for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def _width_lookup(dense: Mapping[str, int], widths: Mapping[str, int] | None) -> Callable[[str], int]:
    """``name -> width``: ``widths`` where given, else the dense network's; unknown names and
    non-positive widths are refused (a typo must not silently build the dense network)."""
    widths = dict(widths or {})
    unknown = sorted(set(widths) - set(dense))
    if unknown:
        raise ValueError(
            f"widths name convs the network does not have: {unknown[:5]}; known: conv1, layer1.0.conv1, ..."
        )
    bad = {
        name: value
        for name, value in widths.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    }
    if bad:
        raise ValueError(f"widths must be positive integers, got {bad}")
    return lambda name: widths.get(name, dense[name])


def resnet50(num_classes: int = 1000, widths: Mapping[str, int] | None = None) -> nn.Module:
    """torchvision's ResNet-50 when torchvision imports (any failure falls back), else :class:`ResNet50`;
    always :class:`ResNet50` for other ``widths`` (a pruned ResNet-50)."""
    if widths:
        return ResNet50(num_classes, widths)
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
#: The baselines that take ``widths`` (a channel-pruned network), with their published widths.
DENSE_WIDTHS: dict[str, Callable[[], dict[str, int]]] = {"resnet50": ResNet50.dense_widths}


def list_baselines() -> list[str]:
    return sorted(BASELINES)


def create_baseline(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """A baseline network by name, randomly initialised (``kwargs``: e.g. ResNet-50's ``widths``)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(list_baselines())}")
    return BASELINES[name](num_classes=num_classes, **kwargs)
