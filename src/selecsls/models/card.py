"""The model card: a typed, frozen description of a model, stored in every model file the package writes.

A :class:`ModelCard` says what builds the model (a :class:`~selecsls.models.spec.ModelSpec` or a
baseline's name, and the build arguments), how its inputs are preprocessed, what its outputs are
called and where its weights come from. Its invariants (one class name per output, the input
channels the network reads) are checked once, in the constructor, so every card in the program is a
valid one; an edit is :func:`dataclasses.replace`. ``model.pretrained_cfg``, timm's dict, is a view
derived from it (:meth:`ModelCard.pretrained_cfg`).

In a file the card is JSON text: for a SelecSLS network the description ``{"format", "version",
"spec", "features_only", "build_args", "pretrained_cfg"}`` (:meth:`ModelCard.to_json`), for a baseline
its ``pretrained_cfg`` alone. Parsing accepts only the keys the package writes, each of its type and
range (:mod:`~selecsls.models.validation`), so a hand-made file can neither pass other arguments to
the builder nor declare sizes that make the loader allocate gigabytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from selecsls.models.baselines import DENSE_WIDTHS, list_baselines, narrowed_widths
from selecsls.models.spec import ModelSpec
from selecsls.models.validation import (
    GLOBAL_POOLS,
    MAX_FEATURE_LEVELS,
    MAX_NAME,
    MAX_WIDTH,
    OUTPUT_STRIDES,
    InvalidInput,
    check_bool,
    check_choice,
    check_crop_pct,
    check_drop_rate,
    check_fields,
    check_img_side,
    check_int,
    check_interpolation,
    check_normalization,
    check_num_classes,
    check_number,
    check_sequence,
    check_text,
    json_object,
)

__all__ = [
    "BASELINE_KEY",
    "CARD_KEYS",
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAYLOAD_KEY",
    "ModelCard",
    "Preprocessing",
    "Provenance",
]

FORMAT = "selecsls.model"
FORMAT_VERSION = 1
#: Key of a SelecSLS network's description in a model file (a torch file's dict, safetensors metadata).
PAYLOAD_KEY = "selecsls"
#: Key naming the architecture in a file of a baseline (no spec to store), beside its ``pretrained_cfg``.
BASELINE_KEY = "baseline"
#: Every key a card takes among a model file's entries (:meth:`ModelCard.entries`).
CARD_KEYS = (PAYLOAD_KEY, BASELINE_KEY, "pretrained_cfg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DESCRIPTION_KEYS = {"format", "version", "spec", "features_only", "build_args", "pretrained_cfg"}
#: timm's ``pretrained_cfg`` keys the card derives from the build rather than storing.
_DERIVED_CFG_KEYS = {"architecture", "first_conv", "classifier", "pool_size", "num_classes"}


@dataclass(frozen=True)
class Preprocessing:
    """How images become the model's input: resize to ``input_size`` / ``crop_pct``, centre crop, normalise."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:  # object.__setattr__: normalising the fields of a frozen dataclass
        channels, *sides = check_sequence("input_size", self.input_size, (3,), "integers")
        sides = [check_img_side("input_size", side) for side in sides]  # the limits of --img-size
        object.__setattr__(self, "input_size", (check_int("input_size", channels, 1, MAX_WIDTH), *sides))
        mean, std = check_normalization(self.mean, self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", check_crop_pct("crop_pct", self.crop_pct))
        object.__setattr__(self, "interpolation", check_interpolation("interpolation", self.interpolation))


@dataclass(frozen=True)
class Provenance:
    """Where the weights come from: a published entry's tag and URL, and its published accuracy (%)."""

    tag: str | None = None
    url: str | None = None
    top1: float | None = None
    top5: float | None = None

    def __post_init__(self) -> None:
        for name in ("tag", "url"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_text(name, getattr(self, name)))
        for name in ("top1", "top5"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_number(name, getattr(self, name), 0.0, 100.0))


@dataclass(frozen=True)
class ModelCard:
    """What a model is: how to build it, preprocess its inputs and name its outputs, and where it comes from.

    ``architecture`` is a spec (a SelecSLS network) or a name (a baseline, or the network an
    exported graph was made from). ``features_only`` networks have no classifier (``num_classes``
    0) and return the levels ``out_indices`` (None: all). ``preprocessing`` defaults to 224 px
    ImageNet statistics for the network's input channels.
    """

    architecture: ModelSpec | str
    num_classes: int = 1000
    drop_rate: float = 0.0
    global_pool: str = "avg"
    output_stride: int | None = None
    fused: bool = False
    features_only: bool = False
    out_indices: tuple[int, ...] | None = None
    preprocessing: Preprocessing | None = None
    label_names: tuple[str, ...] | None = None
    provenance: Provenance = field(default_factory=Provenance)
    #: A baseline's conv widths where they differ from the published network's (channel-pruned),
    #: as sorted (conv name, output channels) pairs; its files need not store them: the weights do.
    widths: tuple[tuple[str, int], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, ModelSpec):
            check_text("architecture", self.architecture, MAX_NAME)
        check_num_classes("num_classes", self.num_classes)
        check_drop_rate("drop_rate", self.drop_rate)
        check_choice("global_pool", self.global_pool, GLOBAL_POOLS)
        check_choice("output_stride", self.output_stride, OUTPUT_STRIDES)
        check_bool("fused", self.fused)
        if check_bool("features_only", self.features_only) and self.num_classes:
            raise InvalidInput("a features_only model has no classifier: num_classes must be 0")
        if self.out_indices is not None:
            if not self.features_only:
                raise InvalidInput("out_indices only applies with features_only=True")
            levels = check_sequence("out_indices", self.out_indices, range(MAX_FEATURE_LEVELS + 1), "feature levels")
            object.__setattr__(
                self, "out_indices", tuple(check_int("out_indices", i, -MAX_FEATURE_LEVELS, 15) for i in levels)
            )
        if self.preprocessing is None:
            object.__setattr__(self, "preprocessing", Preprocessing(input_size=(self.in_chans, 224, 224)))
        elif isinstance(self.architecture, ModelSpec) and self.preprocessing.input_size[0] != self.in_chans:
            raise InvalidInput(
                f"input_size {self.preprocessing.input_size} has {self.preprocessing.input_size[0]} channels but the "
                f"network reads {self.in_chans}"
            )
        if self.widths is not None:
            if self.name not in DENSE_WIDTHS:
                raise InvalidInput(f"{self.name} has no other widths; only {sorted(DENSE_WIDTHS)} take them")
            known, widths = DENSE_WIDTHS[self.name](), {}
            for pair in check_sequence("widths", self.widths, range(len(known) + 1), "(conv, channels) pairs"):
                conv, channels = check_sequence("widths", pair, (2,), "items: a conv name and its channels")
                if conv not in known:
                    raise InvalidInput(f"widths name a conv {self.name} does not have: {conv!r:.60}")
                widths[conv] = check_int(f"the width of {conv}", channels, 1, MAX_WIDTH)
            object.__setattr__(self, "widths", tuple(sorted(widths.items())) or None)
        if self.label_names is not None:
            names = check_sequence("label_names", self.label_names, (self.num_classes,), "class names, one per output")
            exact = tuple(check_text("label_names", name, MAX_NAME, exact=True) for name in names)
            object.__setattr__(self, "label_names", exact)  # matched against folder names: never altered

    # ------------------------------------------------------------------------- derived
    @property
    def name(self) -> str:
        return self.architecture.name if isinstance(self.architecture, ModelSpec) else self.architecture

    @property
    def in_chans(self) -> int:
        if isinstance(self.architecture, ModelSpec):
            return self.architecture.in_chans
        return self.preprocessing.input_size[0] if self.preprocessing is not None else 3

    @property
    def build_args(self) -> dict[str, Any]:
        """The builder's keyword arguments besides the architecture (``model.build_args`` of the network)."""
        if not isinstance(self.architecture, ModelSpec):
            return {"num_classes": self.num_classes} | ({"widths": dict(self.widths)} if self.widths else {})
        args: dict[str, Any] = dict(drop_rate=self.drop_rate, output_stride=self.output_stride, fused=self.fused)
        if self.features_only:
            return args | {"out_indices": self.out_indices}
        return args | {"num_classes": self.num_classes, "global_pool": self.global_pool}

    def require_outputs(self, task: str, class_scores: bool = True) -> None:
        """Refuse ``task`` before any work on a model whose outputs it cannot use: a features-only model
        returns a list of feature maps, and one without a classifier no class scores (``class_scores``)."""
        if self.features_only:
            problem = "is a features-only backbone: it returns a list of feature maps"
        elif class_scores and not self.num_classes:
            problem = "has no classifier (num_classes 0): it returns pooled features"
        else:
            return
        raise InvalidInput(
            f"{task} needs {'class scores' if class_scores else 'one output tensor'}, but {self.name} {problem}; "
            "fine-tune it into a classifier first (selecsls train --data DIR --init FILE --output RUN)"
        )

    def with_classifier(self, num_classes: int, global_pool: str | None = None) -> ModelCard:
        """The card of the model with a new classifier: the class names belonged to the old one."""
        pool = self.global_pool if global_pool is None else global_pool
        return replace(self, num_classes=num_classes, global_pool=pool, label_names=None)

    def with_image_size(self, height: int, width: int) -> ModelCard:
        size = (self.preprocessing.input_size[0], height, width)
        return replace(self, preprocessing=replace(self.preprocessing, input_size=size))

    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` vocabulary: preprocessing, provenance, class names."""
        network = isinstance(self.architecture, ModelSpec)
        cfg = dict(
            architecture=self.name,
            **asdict(self.preprocessing),
            pool_size=(4, 4),
            num_classes=self.num_classes,
            first_conv="stem.conv" if network else None,
            classifier="fc" if network else None,
        )
        cfg.update({key: value for key, value in asdict(self.provenance).items() if value is not None})
        if self.label_names is not None:
            cfg["label_names"] = self.label_names
        return cfg

    # -------------------------------------------------------------------------- files
    def entries(self) -> dict[str, str]:
        """The card as entries of a model file, beside its ``"state_dict"``."""
        if isinstance(self.architecture, ModelSpec):
            return {PAYLOAD_KEY: self.to_json()}
        return {BASELINE_KEY: self.name, "pretrained_cfg": self.to_json()}

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any]) -> ModelCard | None:
        """The card among a model file's entries (:meth:`entries`), or None in a file the package did not write.

        A baseline's file stores no class count: its classifier, the last matrix of its weights, has it.
        Files of earlier releases may lack the baseline's ``pretrained_cfg``.
        """
        if isinstance(entries.get(PAYLOAD_KEY), str):
            return cls.from_json(entries[PAYLOAD_KEY])
        name = entries.get(BASELINE_KEY)
        if not isinstance(name, str):
            return None
        check_choice("baseline", name, list_baselines())
        state = entries.get("state_dict")
        matrices = [t for t in state.values() if getattr(t, "ndim", 0) == 2] if isinstance(state, Mapping) else []
        build = dict(num_classes=matrices[-1].shape[0] if matrices else 1000, widths=_narrowed(name, state))
        if "pretrained_cfg" not in entries:
            return cls(name, **build)
        cfg = json_object("pretrained_cfg", entries["pretrained_cfg"])
        return cls.from_pretrained_cfg(cfg, name, **build)

    def to_json(self) -> str:
        """The description a file stores: SelecSLS's full description, a baseline's ``pretrained_cfg``."""
        if not isinstance(self.architecture, ModelSpec):
            return json.dumps(self.pretrained_cfg(), sort_keys=True)
        description = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": self.architecture.to_dict(),
            "features_only": self.features_only,
            "build_args": self.build_args,
            "pretrained_cfg": self.pretrained_cfg(),
        }
        return json.dumps(description, sort_keys=True)

    @classmethod
    def from_json(cls, text: Any) -> ModelCard:
        """The card of a SelecSLS network from its stored description (:meth:`to_json`)."""
        where = "the saved model description"
        description = json_object(where, text)
        if description.get("format") != FORMAT or description.get("version") != FORMAT_VERSION:
            raise InvalidInput(
                f"saved model format {description.get('format')!r:.40} version {description.get('version')!r:.40} "
                f"is not {FORMAT!r} version {FORMAT_VERSION}; it was written by another selecsls release"
            )
        check_fields(where, description, _DESCRIPTION_KEYS, _DESCRIPTION_KEYS)
        features_only = check_bool("features_only", description["features_only"])
        allowed = {"drop_rate", "output_stride", "fused"} | (
            {"out_indices"} if features_only else {"num_classes", "global_pool"}
        )
        args = check_fields("build_args", description["build_args"], allowed, {"fused"})
        spec = ModelSpec.from_dict(description["spec"])
        return cls.from_pretrained_cfg(
            description["pretrained_cfg"], spec, **{"num_classes": 0} if features_only else {}, **args,
            features_only=features_only,
        )  # fmt: skip

    @classmethod
    def from_pretrained_cfg(cls, cfg: Any, architecture: ModelSpec | str, **build_args: Any) -> ModelCard:
        """The card of ``architecture`` built with ``build_args`` whose other facts are a ``pretrained_cfg`` dict."""
        keys = {*_DERIVED_CFG_KEYS, *(f.name for f in fields(Preprocessing)), *(f.name for f in fields(Provenance))}
        check_fields("pretrained_cfg", cfg, keys | {"label_names"}, {"input_size"})
        for key in ("architecture", "first_conv", "classifier"):  # derived: checked, then rebuilt from the card
            if cfg.get(key) is not None:
                check_text(key, cfg[key])
        if "pool_size" in cfg:
            for side in check_sequence("pool_size", cfg["pool_size"], (2,), "integers"):
                check_int("pool_size", side, 1, MAX_WIDTH)
        if "num_classes" in cfg:
            check_num_classes("num_classes", cfg["num_classes"])
        # A null value means the default.
        preprocessing, provenance = (
            {f.name: cfg[f.name] for f in fields(kind) if cfg.get(f.name) is not None}
            for kind in (Preprocessing, Provenance)
        )
        return cls(
            architecture,
            **build_args,
            preprocessing=Preprocessing(**preprocessing),
            label_names=cfg.get("label_names"),
            provenance=Provenance(**provenance),
        )


def _narrowed(baseline: str, state: Any) -> tuple[tuple[str, int], ...] | None:
    """The conv widths of a baseline's weights where they differ from the published network's."""
    if not isinstance(state, Mapping):
        return None
    convs = {key.removesuffix(".weight"): t.shape[0] for key, t in state.items() if getattr(t, "ndim", 0) == 4}
    return narrowed_widths(baseline, convs)
