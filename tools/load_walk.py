"""How tangled loading a model file is: the walk of ``selecsls.load(path)``, and two counts of the source.

The walk follows the ``path`` argument and everything derived from it through the package's code
(``sys.settrace``). A *stop* is a function in ``src/selecsls`` called with a followed object, counted
at its first call (a reader reads it once). Followed are the path (or text equal to it), what a stop
returned (with, two levels down, the items of a returned dict, list or tuple; numbers and one-letter
strings, which Python shares, are not followed) and every object a stop receives (the model the
weights are loaded into, say). Comprehensions are not stops, nor a generator's resumptions. From the
stops in call order (consecutive stops in one file counted once):

- *returns*: how often the walk enters a file it had already left (also given counting every call, not
  only the first of each function);
- *climbs*: calls from one stop to another whose module imports the caller's module (a lower layer
  calling back up).

The source counts: the longest file under ``src/selecsls`` and the statements that assign a model's
description (an attribute named ``pretrained_cfg`` or ``card``).

Run from the repository root: ``PYTHONPATH=src python3 tools/load_walk.py FILE [FILE ...]``; ``-v``
lists the stops. tests/fixtures/release_0_1 has files of every kind.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "selecsls"
sys.path.insert(0, str(ROOT / "tests"))

from test_layering import GRAPH, _module_name, _resolve  # noqa: E402  (after the path set-up above)

DESCRIPTION_ATTRIBUTES = {"pretrained_cfg", "card"}
_UNFOLLOWED = (int, float, bool, complex, type(None), bytes)


def module_of(filename: str) -> str:
    return _module_name(Path(filename).resolve())


def import_closure() -> dict[str, set[str]]:
    """Module -> every package module it imports, directly or through others (the graph the layering test checks)."""
    closure: dict[str, set[str]] = {}

    def reach(module: str) -> set[str]:
        if module not in closure:
            closure[module] = set()
            for name in GRAPH.get(module, ()):
                target = _resolve(name)
                closure[module] |= {target} | reach(target)
        return closure[module]

    for module in GRAPH:
        reach(module)
    return closure


class Walk:
    """The stops of one call, recorded by a trace function."""

    def __init__(self, path: str) -> None:
        self.path_text = os.fspath(path)
        self.followed: dict[int, object] = {}  # id -> object (kept alive so ids stay unique)
        self.calls: list[tuple[str, str, int, str | None]] = []  # (module, function, line, caller module)
        self.active: dict[int, str] = {}  # frame id -> module, for stops still running
        self.generators: dict[int, object] = {}  # generator frames seen: a resumption is no new call

    def _is_followed(self, value: object) -> bool:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value) == self.path_text or id(value) in self.followed
        return id(value) in self.followed

    def _follow(self, value: object, depth: int = 2) -> None:
        if isinstance(value, _UNFOLLOWED) or (isinstance(value, str) and len(value) < 2):  # shared objects
            return
        self.followed[id(value)] = value
        if depth and isinstance(value, dict):
            for item in value.values():
                self._follow(item, depth - 1)
        elif depth and isinstance(value, (list, tuple)):
            for item in value:
                self._follow(item, depth - 1)

    def trace(self, frame, event, arg):
        if event != "call":
            return None
        filename = frame.f_code.co_filename
        if not filename.startswith(str(PACKAGE)) or frame.f_code.co_name.startswith("<"):
            return None
        if frame.f_code.co_flags & inspect.CO_GENERATOR:
            if id(frame) in self.generators:
                return None
            self.generators[id(frame)] = frame
        arguments = list(frame.f_locals.values())
        if not any(self._is_followed(value) for value in arguments):
            return None
        caller = frame.f_back
        while caller is not None and id(caller) not in self.active:
            caller = caller.f_back
        module = module_of(filename)
        self.calls.append((module, frame.f_code.co_qualname, frame.f_code.co_firstlineno, self.active.get(id(caller))))
        self.active[id(frame)] = module
        for value in arguments:
            self._follow(value, depth=0)

        def on_return(inner_frame, inner_event, inner_arg):
            if inner_frame is frame and inner_event == "return":
                self._follow(inner_arg)
                self.active.pop(id(frame), None)
            return on_return

        return on_return

    def run(self, load) -> None:
        sys.settrace(self.trace)
        try:
            load()
        finally:
            sys.settrace(None)


def stops(calls: list[tuple]) -> list[tuple]:
    """Each function once, at its first call: a reader reads it once."""
    seen: set[tuple] = set()
    return [call for call in calls if call[:3] not in seen and not seen.add(call[:3])]


def visits(calls: list[tuple]) -> list[str]:
    """The modules of ``calls`` in order, consecutive calls in one module counted once."""
    files: list[str] = []
    for module, *_ in calls:
        if not files or files[-1] != module:
            files.append(module)
    return files


def returns(calls: list[tuple]) -> int:
    files = visits(calls)
    return sum(module in files[:i] for i, module in enumerate(files))


def summary(walk: Walk, closure: dict[str, set[str]]) -> dict[str, int]:
    read = stops(walk.calls)
    return {
        "stops": len(read),
        "files": len(set(visits(read))),
        "returns": returns(read),
        "returns counting every call": returns(walk.calls),
        "climbs": sum(caller is not None and caller in closure.get(module, ()) for module, _, _, caller in walk.calls),
    }


def longest_file() -> tuple[int, str]:
    return max((len(path.read_text().splitlines()), str(path.relative_to(SRC))) for path in PACKAGE.rglob("*.py"))


def description_assignments() -> list[str]:
    """``file:line`` of every statement assigning a model's description attribute."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and any(
                isinstance(target, ast.Attribute) and target.attr in DESCRIPTION_ATTRIBUTES for target in targets
            ):
                sites.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return sites


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="model files to load")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every stop")
    args = parser.parse_args()
    import warnings

    import selecsls

    closure = import_closure()
    for path in args.files:
        walk = Walk(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            walk.run(lambda path=path: selecsls.load(path))
        counts = summary(walk, closure)
        print(f"{path}: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
        if args.verbose:
            for module, function, line, caller in stops(walk.calls):
                print(f"  {module}.{function}:{line}  (from {caller})")
            print("  files in order: " + " > ".join(visits(stops(walk.calls))))
    length, name = longest_file()
    sites = description_assignments()
    print(f"longest source file: {name}, {length} lines")
    print(f"description assigned in {len(sites)} places: {', '.join(sites)}")


if __name__ == "__main__":
    main()
