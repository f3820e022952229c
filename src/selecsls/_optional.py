"""Optional dependencies (the ``all`` extra), imported where they are used.

The core install needs only torch, numpy and Pillow. Code that needs more calls :func:`require`,
so a missing package is one line naming the extra to install rather than a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def require(module: str, purpose: str, extra: str = "all") -> ModuleType:
    """``module`` imported, or :class:`MissingDependency` saying it is needed ``purpose`` (e.g. "to plot")."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # the package is there but broken: show the real error
        package = module.partition(".")[0]
        raise MissingDependency(
            f"{package} is needed {purpose}; install it with pip install 'selecsls[{extra}]'"
        ) from exc
