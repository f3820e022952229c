"""The package's layers (docs/architecture.md): a module imports only its own layer and lower ones, and no
import cycle exists between modules (function-level imports included)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: Lowest first. The top-level package only re-exports (lazily) and is not a layer.
LAYERS = ("_io", "_optional", "_timing", "models", "compress", "data", "train", "deploy", "bench", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``selecsls.*`` module imported anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("selecsls.")}


GRAPH = {
    _module_name(path): _imports(path)
    for path in sorted((SRC / "selecsls").rglob("*.py"))
    if _module_name(path) not in ("selecsls", "selecsls.__main__")
}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_module_belongs_to_a_layer():
    assert all(module.split(".")[1] in LAYERS for module in GRAPH), sorted(GRAPH)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    higher = sorted(name for name in GRAPH[module] if _layer(name) > _layer(module))
    assert not higher, f"{module} (layer {LAYERS[_layer(module)]}) imports higher layers: {higher}"


def _resolve(name: str) -> str:
    """``selecsls.models.create_model``-style imports of a package resolve to the package's __init__."""
    return name if name in GRAPH else name.rpartition(".")[0]


def test_no_import_cycles():
    edges = {module: {_resolve(name) for name in names} & GRAPH.keys() for module, names in GRAPH.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if target == module or (target in module and module.startswith(target + ".")):
                continue  # a package's own __init__ importing its modules, or a module its package
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target] if target in trail else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


#: Code outside the package uses its public API, never the private modules (``selecsls._io``, ...); the one
#: exception tests the private module itself.
OUTSIDE = ("benchmarks", "references", "examples", "tests")
TESTS_OF_PRIVATE_MODULES = {"tests/test_io.py"}


def _names(path: Path) -> set[str]:
    """Every ``selecsls`` module and name a file imports (``from selecsls import _io`` gives ``selecsls._io``)."""
    found = set(_imports(path))
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "selecsls":
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_nothing_outside_the_package_imports_a_private_module():
    root = SRC.parent
    found = []
    for folder in OUTSIDE:
        for path in sorted((root / folder).rglob("*.py")):
            if str(path.relative_to(root)) in TESTS_OF_PRIVATE_MODULES:
                continue
            private = sorted(name for name in _names(path) if name.split(".")[1].startswith("_"))
            found += [f"{path.relative_to(root)}: {name}" for name in private]
    assert not found, "private modules imported outside src/ (use the public API): " + ", ".join(found)
