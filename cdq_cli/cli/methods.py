"""``cdq methods``: every solver and the ``-o KEY=VALUE`` options it takes (type, range, default)."""

from __future__ import annotations

import inspect

import typer
from rich.console import Console

from ..solvers import OPTIONS, SOLVERS
from .printing import print_json

SUMMARY = {
    "cdq": "cdq's own (default): best of GPTQ starts, then CD sweeps with grid refits",
    "quantease": "QuantEase: cyclic coordinate descent on a fixed min-max grid",
    "quantease-outlier": "QuantEase keeping a sparse full-precision outlier matrix",
    "comq": "COMQ: CD over codes and scales in greedy order",
    "gptq": "GPTQ baseline",
    "rtn": "round-to-nearest baseline",
}


def methods(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """The layer solvers and the -o KEY=VALUE options of each (type, range, default)."""
    listing = {}
    for method, solver in SOLVERS.items():
        defaults = {
            name: param.default
            for name, param in inspect.signature(solver).parameters.items()
            if param.kind is inspect.Parameter.KEYWORD_ONLY
        }
        listing[method] = {
            "summary": SUMMARY.get(method, ""),
            "options": {
                name: {"label": option.label, "accepts": option.describe(), "default": _shown(defaults[name])}
                for name, option in OPTIONS[method].items()
            },
        }
    if as_json:
        print_json(listing)
        return
    console = Console(highlight=False, soft_wrap=True)
    for method, entry in listing.items():
        console.print(f"[bold]{method}[/bold]: {entry['summary']}")
        for name, option in entry["options"].items():
            console.print(f"  -o {name}={option['default']}   {option['label']}: {option['accepts']}")
        if not entry["options"]:
            console.print("  (no options)")


def _shown(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else value
