"""Architecture as data: one spec type describes every SelecSLS network, dense or pruned.

A :class:`ModelSpec` gives the output width of every convolution. Input widths are
derived (and cross-checked where the spec states them), so a pruned network is simply
a spec with smaller numbers, built by the same :class:`selecsls.models.network.SelecSLS` class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from selecsls.models.validation import (
    MAX_BLOCKS,
    MAX_CONV_PARAMS,
    MAX_HEAD_CONVS,
    MAX_NAME,
    MAX_WIDTH,
    InvalidInput,
    check_bool,
    check_fields,
    check_int,
    check_sequence,
    check_text,
)

__all__ = [
    "CONCAT_CONVS",
    "BlockSpec",
    "HeadConvSpec",
    "ModelSpec",
    "SpecError",
    "VARIANTS",
    "canonical_name",
    "get_spec",
    "list_variants",
]


class SpecError(InvalidInput):
    """An architecture spec that cannot describe a working network."""


#: The convs of a block whose outputs conv6 concatenates (before the stage skip): the wiring
#: that makes every SelecSLS skip a concatenation, read by the spec, the network and pruning.
CONCAT_CONVS = (1, 3, 5)

_SPEC_FIELDS = {"name", "stem_chs", "blocks", "head", "in_chans"}
_BLOCK_FIELDS = {"in_chs", "skip_chs", "widths", "first"}
_HEAD_FIELDS = {"out_chs", "kernel_size", "stride"}


@dataclass(frozen=True)
class BlockSpec:
    """One SelecSLS block.

    ``widths`` are the output channels of conv1..conv6. conv1 (3x3, stride 2 when
    ``first``) reads the block input; conv2 (1x1) and conv3 (3x3) refine conv1's output;
    conv4 (1x1) and conv5 (3x3) refine conv3's; conv6 (1x1) reads the concatenation
    ``[conv1, conv3, conv5, skip]``, where ``skip`` is the output of the stage's first
    block (absent in the first block itself).
    """

    in_chs: int
    skip_chs: int
    widths: tuple[int, int, int, int, int, int]
    first: bool

    @classmethod
    def dense(cls, in_chs: int, skip_chs: int, mid: int, out: int, first: bool = False) -> BlockSpec:
        """The published block shape: widths (mid, mid, mid/2, mid, mid/2, out)."""
        return cls(in_chs, skip_chs, (mid, mid, mid // 2, mid, mid // 2, out), first)

    @property
    def out_chs(self) -> int:
        return self.widths[5]

    @property
    def concat_parts(self) -> tuple[int, ...]:
        """Widths of what conv6 reads, in order: the :data:`CONCAT_CONVS` outputs, then the skip."""
        convs = tuple(self.widths[k - 1] for k in CONCAT_CONVS)
        return convs if self.first else (*convs, self.skip_chs)

    @property
    def concat_chs(self) -> int:
        """Input width of conv6."""
        return sum(self.concat_parts)

    def conv_in_chs(self) -> tuple[int, int, int, int, int, int]:
        w = self.widths
        return (self.in_chs, w[0], w[1], w[2], w[3], self.concat_chs)


@dataclass(frozen=True)
class HeadConvSpec:
    """A conv+BN+ReLU of the head that follows the last stage."""

    out_chs: int
    kernel_size: int
    stride: int


@dataclass(frozen=True)
class ModelSpec:
    """A whole SelecSLS network: stem width, blocks, head convs.

    The classifier reads ``num_features`` (the last head width); its output size is a
    build option, not part of the architecture.
    """

    name: str
    stem_chs: int
    blocks: tuple[BlockSpec, ...]
    head: tuple[HeadConvSpec, ...]
    in_chans: int = 3

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so specs stay hashable.
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "head", tuple(self.head))
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def num_features(self) -> int:
        return self.head[-1].out_chs if self.head else self.blocks[-1].out_chs

    def block_sources(self) -> tuple[tuple[str, str | None], ...]:
        """For each block, the layers it reads: (its input, its stage skip or None for a first block).

        The one place that tracks which block output each stage's skip is; everything that
        needs the wiring (validation, re-widthing, channel flow) derives from it.
        """
        sources, current, stage_first = [], "stem", ""
        for i, block in enumerate(self.blocks):
            sources.append((current, None if block.first else stage_first))
            current = f"features.{i}.conv6"
            if block.first:
                stage_first = current
        return tuple(sources)

    def stages(self) -> list[list[int]]:
        """Block indices grouped by stage (a stage starts at each ``first`` block)."""
        stages: list[list[int]] = []
        for i, block in enumerate(self.blocks):
            if block.first:
                stages.append([])
            stages[-1].append(i)
        return stages

    def conv_layers(self) -> Iterator[tuple[str, int, int, int]]:
        """(layer name, in channels, out channels, kernel size) of every conv, in order."""
        yield "stem", self.in_chans, self.stem_chs, 3
        kernels = (3, 1, 3, 1, 3, 1)
        for i, block in enumerate(self.blocks):
            for k, (cin, cout, ks) in enumerate(zip(block.conv_in_chs(), block.widths, kernels), start=1):
                yield f"features.{i}.conv{k}", cin, cout, ks
        cin = self.blocks[-1].out_chs
        for i, conv in enumerate(self.head):
            yield f"head.{i}", cin, conv.out_chs, conv.kernel_size
            cin = conv.out_chs

    def conv_params(self) -> int:
        """Number of conv weights the network has (computed from the widths, nothing allocated)."""
        return sum(cin * cout * k * k for _, cin, cout, k in self.conv_layers())

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first layer that cannot be built."""
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME:
            raise SpecError(f"spec name must be a string of at most {MAX_NAME} characters")
        if not 1 <= self.in_chans <= MAX_WIDTH:
            raise SpecError(f"spec {self.name!r}: in_chans must be in 1..{MAX_WIDTH}, got {self.in_chans}")
        if not 1 <= self.stem_chs <= MAX_WIDTH:
            raise SpecError(
                f"spec {self.name!r}: layer 'stem' has width {self.stem_chs}; every width must be in 1..{MAX_WIDTH}"
            )
        if not self.blocks:
            raise SpecError(f"spec {self.name!r}: needs at least one block")
        if len(self.blocks) > MAX_BLOCKS or len(self.head) > MAX_HEAD_CONVS:
            raise SpecError(
                f"spec {self.name!r}: at most {MAX_BLOCKS} blocks and {MAX_HEAD_CONVS} head convs, "
                f"got {len(self.blocks)} and {len(self.head)}"
            )
        if not self.blocks[0].first:
            raise SpecError(
                f"spec {self.name!r}: block features.0 must be first of its stage (first=True); "
                "the first block has no skip input"
            )
        out_widths = {"stem": self.stem_chs} | {f"features.{i}.conv6": b.out_chs for i, b in enumerate(self.blocks)}
        for i, (block, (source, skip)) in enumerate(zip(self.blocks, self.block_sources())):
            where = f"spec {self.name!r}: block features.{i}"
            if len(block.widths) != 6:
                raise SpecError(f"{where} needs 6 conv widths, got {len(block.widths)}")
            for k, w in enumerate(block.widths, start=1):
                if not isinstance(w, int) or not 1 <= w <= MAX_WIDTH:
                    raise SpecError(
                        f"{where}.conv{k} has width {w!r}; every width must be an integer in 1..{MAX_WIDTH}"
                    )
            if block.in_chs != out_widths[source]:
                raise SpecError(
                    f"{where} declares in_chs={block.in_chs} but {source} outputs {out_widths[source]} channels"
                )
            expected_skip = 0 if skip is None else out_widths[skip]
            if block.skip_chs != expected_skip:
                reason = (
                    "a first block takes no skip input"
                    if skip is None
                    else f"the skip is the output of the stage's first block ({expected_skip} channels)"
                )
                raise SpecError(f"{where} declares skip_chs={block.skip_chs} but {reason}")
        for i, conv in enumerate(self.head):
            where = f"spec {self.name!r}: layer head.{i}"
            if not 1 <= conv.out_chs <= MAX_WIDTH:
                raise SpecError(f"{where} has width {conv.out_chs}; every width must be in 1..{MAX_WIDTH}")
            if conv.kernel_size not in (1, 3) or conv.stride not in (1, 2):
                raise SpecError(
                    f"{where} must have kernel 1 or 3 and stride 1 or 2, got {conv.kernel_size}/{conv.stride}"
                )
        if self.conv_params() > MAX_CONV_PARAMS:
            raise SpecError(
                f"spec {self.name!r} declares {self.conv_params():,} conv weights, more than the "
                f"{MAX_CONV_PARAMS:,} any SelecSLS network needs; the spec is corrupt or hand-made"
            )

    # ----------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec a :meth:`to_dict` dict describes; anything else (unknown or missing fields, wrong
        types, sizes out of range) is a :class:`SpecError`, raised before anything is allocated."""
        try:
            return cls._parse(data)
        except SpecError:
            raise
        except InvalidInput as exc:
            raise SpecError(f"not a SelecSLS spec: {exc}") from None

    @classmethod
    def _parse(cls, data: Any) -> ModelSpec:
        check_fields("spec", data, _SPEC_FIELDS, _SPEC_FIELDS - {"in_chans"}, noun="field")
        blocks = check_sequence("blocks", data["blocks"], range(MAX_BLOCKS + 1), "blocks")
        head = check_sequence("head", data["head"], range(MAX_HEAD_CONVS + 1), "head convs")
        parsed_blocks = []
        for i, block in enumerate(blocks):
            where = f"blocks[{i}]"
            check_fields(where, block, _BLOCK_FIELDS, _BLOCK_FIELDS, noun="field")
            widths = check_sequence(f"{where}.widths", block["widths"], (6,), "integers")
            parsed_blocks.append(
                BlockSpec(
                    check_int(f"{where}.in_chs", block["in_chs"], 0, MAX_WIDTH),
                    check_int(f"{where}.skip_chs", block["skip_chs"], 0, MAX_WIDTH),
                    tuple(check_int(f"{where}.widths", w, 1, MAX_WIDTH) for w in widths),
                    check_bool(f"{where}.first", block["first"]),
                )
            )
        parsed_head = []
        for i, conv in enumerate(head):
            check_fields(f"head[{i}]", conv, _HEAD_FIELDS, _HEAD_FIELDS, noun="field")
            parsed_head.append(
                HeadConvSpec(**{key: check_int(f"head[{i}].{key}", conv[key], 1, MAX_WIDTH) for key in _HEAD_FIELDS})
            )
        return cls(
            name=check_text("name", data["name"], MAX_NAME),
            stem_chs=check_int("stem_chs", data["stem_chs"], 1, MAX_WIDTH),
            blocks=tuple(parsed_blocks),
            head=tuple(parsed_head),
            in_chans=check_int("in_chans", data.get("in_chans", 3), 1, MAX_WIDTH),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    def with_in_chans(self, in_chans: int) -> ModelSpec:
        return replace(self, in_chans=in_chans) if in_chans != self.in_chans else self

    def with_widths(self, widths: dict[str, int], name: str | None = None) -> ModelSpec:
        """A copy whose conv output widths are replaced by ``widths`` (layer name -> width).

        Dependent input widths (next block's ``in_chs``, skip widths) are re-derived, so
        pruning only has to decide how many channels each conv keeps.
        """
        known = {layer for layer, *_ in self.conv_layers()}
        unknown = sorted(set(widths) - known)
        if unknown:
            raise SpecError(
                f"spec {self.name!r} has no conv layer(s) {unknown}; valid names look like 'features.3.conv2'"
            )
        out_widths = {"stem": widths.get("stem", self.stem_chs)}
        blocks = []
        for i, (block, (source, skip)) in enumerate(zip(self.blocks, self.block_sources())):
            new_widths = tuple(widths.get(f"features.{i}.conv{k}", w) for k, w in enumerate(block.widths, start=1))
            blocks.append(
                BlockSpec(out_widths[source], 0 if skip is None else out_widths[skip], new_widths, block.first)
            )
            out_widths[f"features.{i}.conv6"] = new_widths[5]
        head = tuple(replace(h, out_chs=widths.get(f"head.{i}", h.out_chs)) for i, h in enumerate(self.head))
        return ModelSpec(name or self.name, out_widths["stem"], tuple(blocks), head, self.in_chans)


def _head(*convs: tuple[int, int, int]) -> tuple[HeadConvSpec, ...]:
    return tuple(HeadConvSpec(*c) for c in convs)


def _blocks(*rows: tuple) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec.dense(*row) for row in rows)


_B42 = _blocks(
    (32, 0, 64, 64, True),
    (64, 64, 64, 128),
    (128, 0, 144, 144, True),
    (144, 144, 144, 288),
    (288, 0, 304, 304, True),
    (304, 304, 304, 480),
)  # fmt: skip  (one row per stage)
_B60 = _blocks(
    (32, 0, 64, 64, True),
    (64, 64, 64, 128),
    (128, 0, 128, 128, True),
    (128, 128, 128, 128),
    (128, 128, 128, 288),
    (288, 0, 288, 288, True),
    (288, 288, 288, 288),
    (288, 288, 288, 288),
    (288, 288, 288, 416),
)  # fmt: skip  (one row per stage)
_B84 = _blocks(
    (32, 0, 64, 64, True),
    (64, 64, 64, 144),
    (144, 0, 144, 144, True),
    *[(144, 144, 144, 144)] * 3,
    (144, 144, 144, 304),
    (304, 0, 304, 304, True),
    *[(304, 304, 304, 304)] * 4,
    (304, 304, 304, 512),
)  # fmt: skip  (one row per stage)
_B102 = _blocks(
    (32, 0, 64, 64, True),
    *[(64, 64, 64, 64)] * 2,
    (64, 64, 64, 128),
    (128, 0, 128, 128, True),
    *[(128, 128, 128, 128)] * 3,
    (128, 128, 128, 288),
    (288, 0, 288, 288, True),
    *[(288, 288, 288, 288)] * 5,
    (288, 288, 288, 480),
)  # fmt: skip  (one row per stage)

_HEAD = _head((960, 3, 2), (1024, 3, 1), (1024, 3, 2), (1280, 1, 1))
_HEAD_B = _head((960, 3, 2), (1024, 3, 1), (1280, 3, 2), (1024, 1, 1))
_HEAD_60 = _head((756, 3, 2), (1024, 3, 1), (1024, 3, 2), (1280, 1, 1))
_HEAD_60B = _head((756, 3, 2), (1024, 3, 1), (1280, 3, 2), (1024, 1, 1))

#: The published SelecSLS networks (XNect), by timm-compatible name.
VARIANTS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("selecsls42", 32, _B42, _HEAD),
        ModelSpec("selecsls42b", 32, _B42, _HEAD_B),
        ModelSpec("selecsls60", 32, _B60, _HEAD_60),
        ModelSpec("selecsls60b", 32, _B60, _HEAD_60B),
        ModelSpec("selecsls84", 32, _B84, _HEAD),
        ModelSpec("selecsls102", 32, _B102, _HEAD),
    )
}


def list_variants() -> list[str]:
    return sorted(VARIANTS)


def canonical_name(name: str) -> str:
    """'SelecSLS-60' / 'selecsls_60' / 'selecsls60' -> 'selecsls60' (a '.tag' suffix is kept as is)."""
    architecture, dot, tag = name.partition(".")
    return architecture.lower().replace("-", "").replace("_", "") + dot + tag


def get_spec(name: str) -> ModelSpec:
    """The published spec for ``name`` (case-insensitive; 'SelecSLS60' and 'selecsls60' both work)."""
    key = canonical_name(name)
    if key in VARIANTS:
        return VARIANTS[key]
    raise SpecError(f"unknown SelecSLS variant {name!r}; choose one of {', '.join(list_variants())}")
