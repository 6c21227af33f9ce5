"""The layering rules of ../shared/DESIGN.md, checked on the source itself.

Every `import` statement in src/bios is read with `ast` — the lazy ones inside functions too,
since a lazy import is still a dependency — and the module graph is checked for circles, for
imports that point up the layers, and for `_private` names taken from another package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The layer a module belongs to: its package under bios (`bios.engine.runs` → `bios.engine`),
    or itself for a top-level module (`bios.types`, `bios.hparams`)."""
    return ".".join(module.split(".")[:2])


MODULES = {module_name(path): path for path in sorted((SRC / "bios").rglob("*.py"))}


def imports_of(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: a relative import (Bios writes absolute ones)"
            target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:  # `from bios.engine import runs` imports a module
                    found.append((submodule, None))
                else:
                    found.append((target, alias.name))
    return [(target, name) for target, name in found if target.split(".")[0] == "bios"]


GRAPH = {module: sorted({target for target, _ in imports_of(module)}) for module in MODULES}


def test_the_checker_reads_imports():
    # The checker itself: known edges are seen, lazy ones included.
    assert "bios.engine.runs" in GRAPH["bios.engine.engine"]
    assert "bios.checkpoints.paths" in GRAPH["bios.recipes.run_folder"]  # a lazy import


def find_circle() -> list[str] | None:
    """A cycle in the module graph (edges to a package count as edges to its __init__)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in GRAPH.get(module, []):
            if target not in MODULES or target == module:
                continue
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                circle = visit(target)
                if circle:
                    return circle
        stack.pop()
        state[module] = 2
        return None

    for module in MODULES:
        if module not in state:
            circle = visit(module)
            if circle:
                return circle
    return None


def test_no_import_circle():
    assert find_circle() is None, " -> ".join(find_circle() or [])


def test_no_package_circle():
    """Between layers too: if bios.a imports bios.b, bios.b imports nothing of bios.a."""
    edges = {
        (unit_of(module), unit_of(target))
        for module, targets in GRAPH.items()
        for target in targets
        if target in MODULES and unit_of(module) != unit_of(target)
    }
    both_ways = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert both_ways == []


LOWER_LAYERS = ("bios.models", "bios.recipes", "bios.objectives", "bios.checkpoints")


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_no_engine_import_from(package):
    offenders = [
        (module, target)
        for module, targets in GRAPH.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if target == "bios.engine" or target.startswith("bios.engine.")
    ]
    assert offenders == []


def test_the_engine_knows_no_transport_server_recipe_or_distribution():
    upper = ("bios.client", "bios.server", "bios.recipes", "bios.commands", "bios.distributed")
    offenders = [
        (module, target)
        for module, targets in GRAPH.items()
        if module.startswith("bios.engine")
        for target in targets
        if target.startswith(upper)
    ]
    assert offenders == []


def test_no_private_name_crosses_a_package():
    offenders = [
        (module, f"{target}.{name}")
        for module in MODULES
        for target, name in imports_of(module)
        if name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and unit_of(target) != unit_of(module)
    ]
    assert offenders == []
