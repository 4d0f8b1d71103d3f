"""``cdq methods``: every solver and the ``-o KEY=VALUE`` options it takes (type, range, default)."""

from __future__ import annotations

import typer
from rich.console import Console

from ..solvers import METHODS
from ..solvers.registry import option_default
from .printing import print_json


def methods(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """The layer solvers and the -o KEY=VALUE options of each (type, range, default)."""
    listing = {}
    for name, method in METHODS.items():
        listing[name] = {
            "summary": method.summary,
            "options": {
                option: {
                    "label": spec.label,
                    "accepts": spec.describe(),
                    "default": _shown(option_default(name, option)),
                }
                for option, spec in method.options.items()
            },
        }
    if as_json:
        print_json(listing)
        return
    console = Console(highlight=False, soft_wrap=True)
    for name, entry in listing.items():
        console.print(f"[bold]{name}[/bold]: {entry['summary']}")
        for option, spec in entry["options"].items():
            console.print(f"  -o {option}={spec['default']}   {spec['label']}: {spec['accepts']}")
        if not entry["options"]:
            console.print("  (no options)")


def _shown(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else value
