"""Class names to indices: both data layouts index their classes the same way, and say which do not fit."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["UnknownClassError", "class_index", "image_count"]


class UnknownClassError(ValueError):
    """Data (``source``) with classes outside the ones it must be scored against (``unknown`` lists them)."""

    def __init__(self, message: str, source: str, unknown: Sequence[str]) -> None:
        super().__init__(message)
        self.source = source
        self.unknown = list(unknown)


def class_index(
    source: str, found: Sequence[str], classes: Sequence[str], counts: Sequence[int] | None = None
) -> dict[str, int]:
    """Position of each ``found`` class name in ``classes``; a name not there is an :class:`UnknownClassError`
    naming it (with its image count, where ``counts`` gives one per found name)."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        shown = unknown
        if counts is not None:
            count_of = dict(zip(found, counts))
            shown = "[" + ", ".join(f"{name!r} ({image_count(count_of[name])})" for name in unknown) + "]"
        raise UnknownClassError(
            f"{source!r} has class(es) {shown} that are not training classes; "
            "remove them or add the same classes to the training split",
            source,
            unknown,
        )
    return {name: index[name] for name in found}


def image_count(count: int) -> str:
    """``count`` images, in words."""
    return f"{count} image{'' if count == 1 else 's'}"
