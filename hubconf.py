"""torch.hub entry points: ``torch.hub.load('<repo or clone>', 'selecsls60', pretrained=True)``.

One entry point per name in ``selecsls.list_models()``, each taking ``create_model``'s
keyword arguments. The clone's ``src/`` is put on the path so no install is needed.
"""

import os as _os
import sys as _sys

dependencies = ["torch"]

_SRC = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import selecsls as _selecsls  # noqa: E402  (needs the path set above)


def _entry_point(name):
    def build(pretrained=False, **kwargs):
        return _selecsls.create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"SelecSLS {name}; pretrained=True loads its published ImageNet weights. "
        "Other keyword arguments are those of selecsls.create_model."
    )
    return build


globals().update({_name: _entry_point(_name) for _name in _selecsls.list_models()})
