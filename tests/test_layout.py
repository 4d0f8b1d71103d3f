"""The package's architecture, checked: the arrows point one way, there are no import circles, and
every fixed choice of an option is declared once.

    cli → run → pipeline → solvers          store and models never import the driver or the CLI;
                  ↘ capture, models, store,   solvers import nothing else of cdq.
                    transforms

Every ``import`` statement of every module is read with ``ast``, function-level imports included
(they are dependencies too, only deferred): both the arrows and the circle check count them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdq_cli"

# part -> parts it must never import (a part is a subpackage or a top-level module of cdq_cli)
_DRIVER = {"cli", "run", "pipeline"}
_MIDDLE = {"capture", "models", "store", "calib", "evaluate", "parallel", "placement", "transforms"}
FORBIDDEN = {
    "cli": set(),
    "__main__": set(),
    "run": {"cli"},
    "pipeline": {"cli", "run"},
    "solvers": _DRIVER | _MIDDLE | {"records", "trust", "offline", "cleanup"},
    "kernels": _DRIVER | _MIDDLE | {"records", "solvers", "trust", "offline", "cleanup"},
    "models": _DRIVER
    | {"capture", "store", "calib", "evaluate", "parallel", "records", "solvers", "transforms"},
    "transforms": _DRIVER | {"capture", "store", "calib", "evaluate", "parallel", "placement", "cleanup"},
    "store": _DRIVER | {"capture", "models", "calib", "evaluate", "parallel", "placement"},
    "records": _DRIVER | _MIDDLE,
    "capture": _DRIVER | {"store", "models", "calib", "evaluate", "parallel", "placement"},
    "calib": _DRIVER | _MIDDLE - {"calib"} | {"solvers", "records"},
    "evaluate": _DRIVER | _MIDDLE - {"calib", "evaluate"} | {"solvers", "records"},
    "parallel": _DRIVER | _MIDDLE - {"parallel"} | {"records", "solvers"},
    "placement": _DRIVER | _MIDDLE - {"placement"} | {"solvers"},
    "trust": _DRIVER | _MIDDLE | {"records", "solvers", "kernels", "offline"},
    "offline": _DRIVER | _MIDDLE | {"records", "solvers", "kernels", "trust"},
    "memory": _DRIVER | _MIDDLE | {"records", "solvers", "kernels", "trust", "offline"},
    # what a process removes or says on any exit: used by models and store, imports nothing of cdq
    "cleanup": _DRIVER | _MIDDLE | {"records", "solvers", "kernels", "trust", "offline"},
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


def test_every_part_has_rules() -> None:
    """A new subpackage or top-level module must say what it may not import."""
    parts = {_part(_module_name(p)) for p in SOURCES} - {""}
    assert parts <= set(FORBIDDEN), f"parts without import rules: {sorted(parts - set(FORBIDDEN))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_arrows_point_one_way(path: Path) -> None:
    part = _part(_module_name(path))
    bad = sorted(t for t in _imports(path, top_level_only=False) if _part(t) in FORBIDDEN.get(part, set()))
    assert not bad, f"{_module_name(path)} ({part}) must not import {bad}"


def test_no_import_circles() -> None:
    """No circle, counting function-level imports too (an import hidden in a function still makes
    the two modules depend on each other)."""
    graph = {_module_name(p): _imports(p, top_level_only=False) for p in SOURCES}
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


def _choice_lists(path: Path) -> list[tuple[frozenset[str], str]]:
    """Every fixed list of choices a module declares at its top level: a tuple, list or set of
    two or more string literals, the string keys of a dict literal, the values of an Enum class
    (``(values, where)`` pairs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    where = str(path.relative_to(PACKAGE))

    def strings(node: ast.AST) -> list[str] | None:
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
        if isinstance(node, ast.Dict):
            items = node.keys
        if (
            items
            and len(items) >= 2
            and all(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items)
        ):
            return [i.value for i in items]  # type: ignore[union-attr]
        return None

    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if value is not None and (values := strings(value)) is not None:
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            found.append((frozenset(values), f"{where}:{getattr(target, 'id', '?')}"))
        if isinstance(node, ast.ClassDef) and any(
            getattr(b, "attr", getattr(b, "id", "")) == "Enum" for b in node.bases
        ):
            members = [
                item.value.value
                for item in node.body
                if isinstance(item, ast.Assign)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            ]
            if len(members) >= 2:
                found.append((frozenset(members), f"{where}:{node.name}"))
    return found


# Lists with equal strings that are not one choice declared twice, and why.
NOT_CHOICES = {
    frozenset({"store/shards.py:_UNITS", "store/shards.py:_BINARY"}): "decimal and binary unit multipliers",
    frozenset({"offline.py:_TRUE", "solvers/registry.py:_TRUE"}): (
        "HF_HUB_OFFLINE's true words (huggingface_hub's convention) and -o's boolean words (cdq's)"
    ),
    frozenset({"models/base.py:FUSED_PROJECTIONS", "store/experts.py:FUSED"}): (
        "transformers 5's names of fused-experts parameters, not a choice: models finds them in the "
        "model, store names them in checkpoints, and neither may import the other"
    ),
}


def test_each_choice_list_is_declared_once() -> None:
    """A fixed set of choices (methods, formats, dtypes, offload policies, named data sets...) lives
    in one place; every other use derives from it (the CLI's enums re-export the plan's)."""
    seen: dict[frozenset[str], str] = {}
    twice = []
    for path in SOURCES:
        for values, where in _choice_lists(path):
            if values in seen and frozenset({seen[values], where}) not in NOT_CHOICES:
                twice.append(f"{sorted(values)} in {seen[values]} and {where}")
            seen.setdefault(values, where)
    assert not twice, "choice lists declared twice: " + "; ".join(twice)


def test_cli_declares_no_choices() -> None:
    """The command line's choices come from the plan (run/plan.py) and the registries below it."""
    cli = [p for p in SOURCES if _part(_module_name(p)) == "cli"]
    enums = [
        f"{p.name}:{node.name}"
        for p in cli
        for node in ast.parse(p.read_text(encoding="utf-8")).body
        if isinstance(node, ast.ClassDef)
        and any(getattr(b, "attr", getattr(b, "id", "")) == "Enum" for b in node.bases)
    ]
    assert not enums, f"enums declared in cli/ (declare them in run/plan.py): {enums}"
