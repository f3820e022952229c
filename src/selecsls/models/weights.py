"""Published ImageNet weights as data, and their download into a local cache.

Each :class:`PretrainedWeights` records where a checkpoint lives, how it was evaluated
(input size, interpolation, crop) and its published accuracy, with the source of every
fact. ``create_model(name, pretrained=True)`` uses the variant's default (first) entry;
``'selecsls60.xnect_original'`` picks another one by tag.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

from torch.hub import download_url_to_file

from selecsls._io import atomic_path
from selecsls.models.card import ModelCard, Provenance
from selecsls.models.spec import canonical_name

__all__ = [
    "DownloadError",
    "PretrainedWeights",
    "WEIGHTS",
    "cache_dir",
    "default_weights",
    "download",
    "get_weights",
    "list_weights",
]

#: Environment variable that overrides the download directory.
CACHE_ENV = "SELECSLS_CACHE"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.")  # torch.hub's convention: name-<sha256 prefix>.ext
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Weights that could not be fetched or did not match their published hash."""


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint of a variant."""

    architecture: str
    tag: str
    url: str
    sha256: str | None  # full hash where published; None: unknown
    top1: float  # published ImageNet-1k validation accuracy, %
    top5: float
    interpolation: str
    crop_pct: float
    input_size: tuple[int, int, int] = (3, 224, 224)
    source: str = ""  # where the URL and the numbers come from

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str | None:
        """The full sha256 if known, else the prefix embedded in the file name (as torch.hub checks it)."""
        if self.sha256:
            return self.sha256
        match = _HASH_IN_NAME.search(self.file_name)
        return match.group(1) if match else None

    def describe(self, card: ModelCard) -> ModelCard:
        """``card`` with these weights' preprocessing (at the card's input channels) and provenance."""
        size = (card.in_chans, *self.input_size[1:])
        preprocessing = replace(
            card.preprocessing, input_size=size, interpolation=self.interpolation, crop_pct=self.crop_pct
        )
        provenance = Provenance(self.name, self.url, self.top1, self.top5)
        return replace(card, preprocessing=preprocessing, provenance=provenance)


_TIMM_RELEASE = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-selecsls"
_XNECT_MODELS = "http://gvv.mpi-inf.mpg.de/projects/XNect/assets/models"
_TIMM_SOURCE = (
    "URL: timm/models/selecsls.py default_cfgs (bicubic, crop_pct 0.875); "
    "top-1/top-5: timm results/results-imagenet.csv"
)
_XNECT_SOURCE = (
    "URL: mehtadushy/SelecSLS-Pytorch README 'Older Pretrained Models'; top-1/top-5: 100 - its ImageNet error table; "
    "preprocessing: its util/imagenet_data_loader.py (Resize 256, CenterCrop 224, bilinear)"
)

#: Every published checkpoint; the first entry of a variant is its default. No full sha256
#: is published for any of them: downloads of the timm files are checked against the
#: sha256 prefix in their names; the original XNect files cannot be checked (hash unknown).
WEIGHTS: tuple[PretrainedWeights, ...] = (
    # timm results-imagenet.csv: SelecSls42b.in1k 77.170 / 93.392
    PretrainedWeights(
        "selecsls42b",
        "in1k",
        f"{_TIMM_RELEASE}/selecsls42b-8af30141.pth",
        None,
        77.170,
        93.392,
        "bicubic",
        0.875,
        source=_TIMM_SOURCE,
    ),
    # timm results-imagenet.csv: SelecSls60.in1k 77.984 / 93.832
    PretrainedWeights(
        "selecsls60",
        "in1k",
        f"{_TIMM_RELEASE}/selecsls60-bbf87526.pth",
        None,
        77.984,
        93.832,
        "bicubic",
        0.875,
        source=_TIMM_SOURCE,
    ),
    # timm results-imagenet.csv: SelecSls60b.in1k 78.414 / 94.170
    PretrainedWeights(
        "selecsls60b",
        "in1k",
        f"{_TIMM_RELEASE}/selecsls60b-94e619b5.pth",
        None,
        78.414,
        94.170,
        "bicubic",
        0.875,
        source=_TIMM_SOURCE,
    ),
    # SelecSLS-Pytorch README (2019): top-1 / top-5 error 23.78 / 7.04
    PretrainedWeights(
        "selecsls60",
        "xnect_original",
        f"{_XNECT_MODELS}/SelecSLS60_statedict.pth",
        None,
        76.22,
        92.96,
        "bilinear",
        0.875,
        source=_XNECT_SOURCE,
    ),
    # SelecSLS-Pytorch README: top-1 / top-5 error 23.3 / 6.9
    PretrainedWeights(
        "selecsls84",
        "xnect_original",
        f"{_XNECT_MODELS}/SelecSLS84_statedict.pth",
        None,
        76.7,
        93.1,
        "bilinear",
        0.875,
        source=_XNECT_SOURCE,
    ),
)


def list_weights(pattern: str = "*") -> list[str]:
    """Names ('architecture.tag') of the published weights matching a shell-style pattern."""
    return [w.name for w in WEIGHTS if fnmatch(w.name, pattern)]


def default_weights(architecture: str) -> PretrainedWeights | None:
    """The weights ``pretrained=True`` loads for a variant, or None where none are published."""
    return next((w for w in WEIGHTS if w.architecture == architecture.lower()), None)


def get_weights(name: str) -> PretrainedWeights:
    """Weights by 'architecture' (its default) or 'architecture.tag'."""
    architecture, _, tag = canonical_name(name).partition(".")
    found = (
        next((w for w in WEIGHTS if w.name == f"{architecture}.{tag}"), None) if tag else default_weights(architecture)
    )
    if found is None:
        raise ValueError(
            f"no published weights named {name!r}; available: {', '.join(list_weights())} "
            "(an architecture name alone selects its first entry)"
        )
    return found


def cache_dir() -> Path:
    """$SELECSLS_CACHE, else $TORCH_HOME/selecsls, else ~/.cache/selecsls."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "selecsls"
    return Path.home() / ".cache" / "selecsls"


def download(
    weights: PretrainedWeights | str, directory: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Path of the checkpoint in the cache, downloading (and hash-checking) it first if needed."""
    weights = get_weights(weights) if isinstance(weights, str) else weights
    target = Path(directory) if directory is not None else cache_dir()
    target = target / weights.file_name
    if target.is_file():
        if weights.hash_prefix:
            _check_hash(weights, _sha256_of(target), f"cached file {target}", "delete it to download it again")
        return target
    with atomic_path(target) as partial:  # torch.hub downloads; the full hash check stays ours
        try:
            download_url_to_file(weights.url, str(partial), progress=progress)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(
                f"could not download {weights.name} weights from {weights.url} ({reason}). Without internet access, "
                f"fetch that file elsewhere and pass it: create_model({weights.architecture!r}, "
                f"checkpoint_path='/path/to/{weights.file_name}'), or place it at {target}"
            ) from exc
        if weights.hash_prefix:
            _check_hash(weights, _sha256_of(partial), f"download from {weights.url}", "nothing was saved; try again")
    return target


def _check_hash(weights: PretrainedWeights, sha256: str, what: str, remedy: str) -> None:
    expected = weights.hash_prefix
    if expected and not sha256.startswith(expected):
        raise DownloadError(
            f"{what} has sha256 {sha256}, but {weights.name} is published with sha256 starting {expected}: "
            f"the file is corrupt or was changed; {remedy}"
        )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
