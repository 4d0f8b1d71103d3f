"""What cdq refuses to run: code that comes with its inputs.

A model folder whose config.json or tokenizer_config.json maps classes to its own Python files
(``auto_map``) is refused before anything is loaded, naming the files; every loader also passes
``trust_remote_code=False``. The model loaders (:mod:`cdq_cli.models`) and the reader of output
folders (:mod:`cdq_cli.store`) both ask here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RemoteCodeError(ValueError):
    """A model folder that ships code of its own (or whose config cannot be read); one line."""


def refuse_remote_code(folder: Path) -> None:
    """Refuse ``folder`` when its config.json or tokenizer_config.json names Python files of its
    own (``auto_map``): cdq never runs code that comes with a model."""
    for name in ("config.json", "tokenizer_config.json"):
        config = Path(folder) / name
        if not config.is_file():
            continue
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RemoteCodeError(f"cannot read {config}: {first}") from None
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            files = sorted({str(ref).split("--")[-1].split(".")[0] + ".py" for ref in _flatten(refs)})
            raise RemoteCodeError(
                f"{folder} ships its own Python code ({', '.join(files)}, named by auto_map in {name}); "
                "cdq never runs code that comes with a model"
            )


def _flatten(items: Any) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return out
