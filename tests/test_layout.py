"""The package's architecture, checked: the arrows point one way and there are no import circles.

    cli → run → pipeline → solvers          store and models never import the driver or the CLI;
                  ↘ capture, models, store    solvers import nothing else of cdq.

Every ``import`` statement of every module is read with ``ast`` (function-level imports
included, since they are dependencies too); the circle check uses module-level imports, the ones
that run when a module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdq_cli"

# part -> parts it must never import (a part is a subpackage or a top-level module of cdq_cli)
FORBIDDEN = {
    "solvers": {"cli", "run", "pipeline", "capture", "models", "store", "records", "calib", "evaluate"},
    "kernels": {"cli", "run", "pipeline", "capture", "models", "store", "records", "calib", "evaluate"},
    "models": {"cli", "run", "pipeline", "capture", "store", "records", "solvers", "evaluate"},
    "store": {"cli", "run", "pipeline", "capture", "models", "calib", "evaluate"},
    "records": {"cli", "run", "pipeline", "store", "models"},
    "pipeline": {"cli", "run"},
    "capture": {"cli", "run", "pipeline", "store", "models"},
    "calib": {"cli", "run", "pipeline", "store", "models", "solvers"},
    "evaluate": {"cli", "run", "pipeline", "store", "models", "solvers"},
    "run": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Absolute names of the cdq_cli modules ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else _walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cdq_cli"):
                found.add(target)
                for alias in node.names:  # `from . import x` may name a submodule
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cdq_cli"))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {target for target in found if target in modules and target != name}


def _walk(node: ast.AST) -> list[ast.AST]:
    """Every node under ``node`` except ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    out = [node]
    for child in ast.iter_child_nodes(node):
        test = child.test if isinstance(child, ast.If) else None
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            continue
        out.extend(_walk(child))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_arrows_point_one_way(path: Path) -> None:
    part = _part(_module_name(path))
    bad = sorted(t for t in _imports(path, top_level_only=False) if _part(t) in FORBIDDEN.get(part, set()))
    assert not bad, f"{_module_name(path)} ({part}) must not import {bad}"


def test_no_import_circles() -> None:
    graph = {_module_name(p): _imports(p, top_level_only=True) for p in SOURCES}
    # A package's __init__ importing its own submodules is not a circle through the package.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if node.startswith(nxt + "."):  # a submodule importing its parent package's names
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_model_families_are_data() -> None:
    """Adding a language family is one Family entry: every declared family is a frozen dataclass."""
    from dataclasses import is_dataclass

    from cdq_cli.models.families import FAMILIES
    from cdq_cli.models.vision import VISION_FAMILIES

    for family in [*FAMILIES.values(), *VISION_FAMILIES.values()]:
        assert is_dataclass(family) and type(family).__dataclass_params__.frozen
