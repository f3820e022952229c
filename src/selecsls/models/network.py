"""The SelecSLS network, built from a :class:`~selecsls.models.spec.ModelSpec`.

One class builds every variant: dense, pruned (any widths), BN-fused (a build option:
convs carry a bias and no BatchNorm), classifier or feature pyramid, stride 32/16/8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selecsls.models.conv import SmallMapConv2d
from selecsls.models.spec import BlockSpec, ModelSpec
from selecsls.models.validation import (
    GLOBAL_POOLS,
    OUTPUT_STRIDES,
    check_choice,
    check_drop_rate,
    check_num_classes,
)

__all__ = [
    "ConvNormAct",
    "ConcatConvNormAct",
    "SelecSLSBlock",
    "SelecSLS",
    "SelecSLSFeatures",
]


class ConvNormAct(nn.Module):
    """conv (no bias) + BatchNorm + ReLU; with ``fused=True`` a biased conv + ReLU (BN folded in)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, dilation: int = 1, fused: bool = False
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = SmallMapConv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, bias=fused)
        self.bn = nn.Identity() if fused else nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class ConcatConvNormAct(ConvNormAct):
    """A 1x1 ConvNormAct applied to the channel concatenation of its inputs.

    In training it never builds the concatenation: a 1x1 conv of ``cat(parts)`` equals the
    sum of per-part 1x1 convs with the matching weight slices, and autograd then keeps no
    concatenated copy for backward: 18% less activation memory for selecsls60, with training
    steps within 2% of the concatenating form's time. In eval mode the single conv over
    ``torch.cat`` is the faster one (one large matrix product; 2-7% on CPU); docs/benchmarks.md has
    both measurements. Weights and state-dict keys are those of the plain conv, so every checkpoint fits.
    """

    def __init__(self, part_widths: Sequence[int], out_chs: int, fused: bool = False) -> None:
        super().__init__(sum(part_widths), out_chs, 1, fused=fused)
        # Python ints, so tracing sees constant slices.
        self.part_offsets: list[int] = [sum(part_widths[:i]) for i in range(len(part_widths) + 1)]

    def forward(self, parts: list[Tensor]) -> Tensor:  # type: ignore[override]
        if not self.training:
            return self.act(self.bn(self.conv(torch.cat(parts, 1))))
        # Slices of the one weight: the trained tensor stays the one the optimiser and the state dict see.
        weight, offsets = self.conv.weight, self.part_offsets
        out = F.conv2d(parts[0], weight[:, offsets[0] : offsets[1]], self.conv.bias)
        for i in range(1, len(parts)):
            out = out + F.conv2d(parts[i], weight[:, offsets[i] : offsets[i + 1]])
        return self.act(self.bn(out))


class SelecSLSBlock(nn.Module):
    """Three 3x3 branches concatenated with the stage skip, mixed by a 1x1 conv (conv6)."""

    def __init__(
        self, spec: BlockSpec, stride: int = 1, dilation: int = 1, first_dilation: int = 1, fused: bool = False
    ):
        super().__init__()
        cin, w = spec.conv_in_chs(), spec.widths
        self.is_first = spec.first
        self.conv1 = ConvNormAct(cin[0], w[0], 3, stride, first_dilation, fused)
        self.conv2 = ConvNormAct(cin[1], w[1], 1, fused=fused)
        self.conv3 = ConvNormAct(cin[2], w[2], 3, dilation=dilation, fused=fused)
        self.conv4 = ConvNormAct(cin[3], w[3], 1, fused=fused)
        self.conv5 = ConvNormAct(cin[4], w[4], 3, dilation=dilation, fused=fused)
        self.conv6 = ConcatConvNormAct(spec.concat_parts, w[5], fused=fused)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``skip`` is ignored by a stage's first block (pass anything, e.g. ``x``)."""
        d1 = self.conv1(x)
        d2 = self.conv3(self.conv2(d1))
        d3 = self.conv5(self.conv4(d2))
        if self.is_first:
            return self.conv6([d1, d2, d3])
        return self.conv6([d1, d2, d3, skip])


class _StrideSchedule:
    """Turns strides into dilations once the running reduction would pass ``output_stride``."""

    def __init__(self, output_stride: int) -> None:
        self.output_stride = output_stride
        self.reduction = 1
        self.dilation = 1

    def step(self, stride: int) -> tuple[int, int, int]:
        """(stride to use, dilation of the strided conv, dilation of the convs after it)."""
        first_dilation = self.dilation
        if stride > 1 and self.reduction * stride > self.output_stride:
            self.dilation *= stride
            stride = 1
        self.reduction *= stride
        return stride, first_dilation, self.dilation


class SelecSLS(nn.Module):
    """SelecSLS Net (Mehta et al., XNect, SIGGRAPH 2020) built from a spec.

    Args:
        spec: the architecture (``selecsls.get_spec('selecsls60')`` or a pruned spec).
        num_classes: classifier outputs; 0 gives ``nn.Identity`` (pooled features out).
        in_chans: input channels; overrides ``spec.in_chans``.
        drop_rate: dropout before the classifier.
        global_pool: 'avg', 'max' or '' (no pooling; requires ``num_classes=0``).
        output_stride: None keeps the published strides (64 at the head's end); 32, 16 or 8
            turn later strides into dilations so resolution stays at that stride.
        fused: build convs with a bias and no BatchNorm (see :func:`selecsls.fuse`).
    """

    # ``card`` (a ModelCard: build, preprocessing, class names, provenance) is set by the builder,
    # :func:`selecsls.models.build.build`, which every model of the package comes from.

    def __init__(
        self,
        spec: ModelSpec,
        num_classes: int = 1000,
        in_chans: int | None = None,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        output_stride: int | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a selecsls ModelSpec, got {type(spec).__name__}")
        check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        check_num_classes("num_classes", num_classes)
        check_drop_rate("drop_rate", drop_rate)
        spec = spec.with_in_chans(in_chans) if in_chans is not None else spec
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = spec.in_chans
        self.drop_rate = drop_rate
        self.output_stride = output_stride
        self.fused = fused
        self.grad_checkpointing = False

        schedule = _StrideSchedule(output_stride or 2**30)
        feature_info: list[dict[str, Any]] = []
        stride, dil, _ = schedule.step(2)
        self.stem = ConvNormAct(spec.in_chans, spec.stem_chs, 3, stride, dil, fused)
        feature_info.append(dict(num_chs=spec.stem_chs, reduction=schedule.reduction, module="stem"))

        blocks = []
        self._block_taps: list[int] = [stage[-1] for stage in spec.stages()]
        for i, block in enumerate(spec.blocks):
            stride, first_dil, dil = schedule.step(2 if block.first else 1)
            blocks.append(SelecSLSBlock(block, stride, dil, first_dil, fused))
            if i in self._block_taps:
                feature_info.append(dict(num_chs=block.out_chs, reduction=schedule.reduction, module=f"features.{i}"))
        self.features = nn.ModuleList(blocks)

        head = []
        # Tap the last head conv at each resolution (stride 32 and 64 in the published head).
        self._head_taps: list[int] = [
            i for i in range(len(spec.head)) if i + 1 == len(spec.head) or spec.head[i + 1].stride > 1
        ]
        in_chs = spec.blocks[-1].out_chs
        for i, conv in enumerate(spec.head):
            stride, first_dil, dil = schedule.step(conv.stride)
            dilation = (first_dil if conv.stride > 1 else dil) if conv.kernel_size > 1 else 1
            head.append(ConvNormAct(in_chs, conv.out_chs, conv.kernel_size, stride, dilation, fused))
            in_chs = conv.out_chs
            if i in self._head_taps:
                feature_info.append(dict(num_chs=conv.out_chs, reduction=schedule.reduction, module=f"head.{i}"))
        self.head = nn.Sequential(*head)
        self.feature_info = feature_info
        self.num_features = spec.num_features
        self.head_hidden_size = self.num_features

        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        self._init_weights()

    # ------------------------------------------------------------------ set-up
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    @property
    def build_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this architecture: ``type(model)(model.spec, **model.build_args)``."""
        return dict(
            num_classes=self.num_classes,
            drop_rate=self.drop_rate,
            global_pool=self.global_pool,
            output_stride=self.output_stride,
            fused=self.fused,
        )

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's view of :attr:`card`; edit the card (``dataclasses.replace``), not this dict."""
        return self.card.pretrained_cfg()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (freshly initialised) for ``num_classes`` outputs."""
        if global_pool is not None:
            self.global_pool = check_choice("global_pool", global_pool, GLOBAL_POOLS)
        if check_num_classes("num_classes", num_classes) and self.global_pool == "":
            raise ValueError("global_pool='' returns unpooled feature maps; it needs num_classes=0")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if "card" in self.__dict__:  # a built model: the new outputs have no class names yet
            self.card = self.card.with_classifier(num_classes, self.global_pool)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations (less memory, same result)."""
        self.grad_checkpointing = enable

    # ----------------------------------------------------------------- forward
    def _trunk(self, x: Tensor, tap_levels: list[int]) -> tuple[Tensor, list[Tensor]]:
        """Run stem, blocks and head; also return the outputs at the feature levels in ``tap_levels``."""
        taps: list[Tensor] = []
        x = self.stem(x)
        if 0 in tap_levels:
            taps.append(x)
        level = 1
        skip = x
        for i, block in enumerate(self.features):
            if self.grad_checkpointing:
                x = checkpoint(block, x, skip, use_reentrant=False)
            else:
                x = block(x, skip)
            if block.is_first:
                skip = x
            if i in self._block_taps:
                if level in tap_levels:
                    taps.append(x)
                level += 1
        for i, conv in enumerate(self.head):
            x = conv(x)
            if i in self._head_taps:
                if level in tap_levels:
                    taps.append(x)
                level += 1
        return x, taps

    def forward_features(self, x: Tensor) -> Tensor:
        """Input image batch -> last head feature map (``num_features`` channels, stride 64)."""
        return self._trunk(x, [])[0].contiguous()  # frozen convs (selecsls.freeze) return channels-last maps

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        elif self.global_pool == "max":
            x = x.amax((2, 3))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self._trunk(x, [])[0])  # pooled: any layout will do


class SelecSLSFeatures(SelecSLS):
    """The same network returning a list of feature maps (for detection, pose, segmentation).

    Levels: 0 stem (stride 2), one per stage (4, 8, 16), then the head at 32 and 64.
    """

    def __init__(self, spec: ModelSpec, out_indices: Sequence[int] | None = None, **kwargs: Any) -> None:
        kwargs["num_classes"] = 0
        super().__init__(spec, **kwargs)
        levels = len(self.feature_info)
        if out_indices is None:
            out_indices = tuple(range(levels))
        out_indices = tuple(int(i) + levels if int(i) < 0 else int(i) for i in out_indices)
        bad = [i for i in out_indices if not 0 <= i < levels]
        if bad or len(set(out_indices)) != len(out_indices):
            raise ValueError(
                f"out_indices {tuple(out_indices)} invalid: this network has feature levels 0..{levels - 1}, "
                "each at most once"
            )
        self.out_indices = tuple(sorted(out_indices))
        self.tap_levels: list[int] = list(self.out_indices)
        self.feature_info = [self.feature_info[i] for i in self.out_indices]  # type: ignore[assignment]

    @property
    def build_args(self) -> dict[str, Any]:
        args = super().build_args
        del args["num_classes"], args["global_pool"]
        return args | {"out_indices": self.out_indices}

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [tap.contiguous() for tap in self._trunk(x, self.tap_levels)[1]]  # see forward_features
