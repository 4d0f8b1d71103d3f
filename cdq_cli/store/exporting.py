"""What every export format shares, below the formats themselves: the :class:`ExportFormat` record
each format declares, the error they raise, and the helpers that read the source folder and write
the companion files (tokenizer, report) beside the exported weights.

A format is one module (:mod:`.gptq`, :mod:`.compressed`) that declares ``FORMAT =
ExportFormat(...)``; :mod:`.exports` lists them. Nothing here knows any format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..solvers import GridSpec
from .names import MARKER, WEIGHTS, WEIGHTS_INDEX

_NOT_COPIED = {WEIGHTS, MARKER, "config.json"}
# Methods that keep full-precision outliers beside the grid: no export format holds them.
OUTLIER_METHODS = ("quantease-outlier",)

# layer full name -> (its weight's shape, the grid it will be solved on)
PlannedLayers = Mapping[str, tuple[tuple[int, ...], GridSpec]]


class ExportError(ValueError):
    """What an export format cannot hold; one line for the CLI (exit 2)."""


class ExportSummary(Protocol):
    """What an export returns: ``to_dict()`` holds at least ``output``, ``format``, ``headline``
    (one line saying what was written) and ``engines`` (which runtimes load it)."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ExportFormat:
    """One export format, declared once by its module.

    ``name`` is what ``--format`` takes; ``suffix`` names its default folder beside the native one
    (``<output><suffix>``); ``description`` is its ``--help`` line. ``preflight(layers, skipped=,
    method=, model_type=, kept=)`` refuses, before any work, what the format cannot hold
    (``layers``: what the run will quantize, name -> (shape, grid); ``skipped``: the run's ``--skip``
    patterns; ``kept``: the quantizable layers those keep in full precision; ``model_type``: the
    model's, which names fused experts in checkpoints). ``export(source, dest, overwrite=,
    max_shard_bytes=, **options)`` writes the export of a finished cdq output folder and returns
    its summary; ``options`` maps each format-specific option to the values it accepts (the first
    is the default).
    """

    name: str
    suffix: str
    description: str
    preflight: Callable[..., None]
    export: Callable[..., ExportSummary]
    options: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def default_dest(self, source: Path | str) -> Path:
        """``<source><suffix>``, a sibling of the native folder (which stays: report, resume, cdq eval)."""
        source = Path(source).absolute()
        return source.with_name(f"{source.name}{self.suffix}")

    def check_options(self, options: Mapping[str, str | None]) -> dict[str, str]:
        """The given format options (None: not given) with defaults filled in; one line naming an
        option this format does not take or a value it does not accept."""
        checked = {}
        for key, value in options.items():
            if value is None:
                continue
            if key not in self.options:
                raise ExportError(f"--{key.replace('_', '-')} is not an option of the {self.name} export")
            if value not in self.options[key]:
                raise ExportError(f"{key} must be one of {', '.join(self.options[key])}, got {value!r}")
            checked[key] = value
        return {key: checked.get(key, values[0]) for key, values in self.options.items()}


def refuse_gguf_grids(specs: Mapping[str, GridSpec], fmt: str) -> None:
    """A layer on a GGUF type's grid (block scales, offsets) fits no other export format."""
    for name, spec in specs.items():
        if spec.block_type is not None:
            raise ExportError(
                f"{name} is on the GGUF grid {spec.block_type}: {fmt} cannot hold it (--format gguf)"
            )


def merged_transform(table: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """The ``--transform`` the folder's quantization table records (``{"name": "none"}`` without
    one), checked to be merged into the weights: a transform that needs operations at inference
    time (an online rotation, say) is something no plain checkpoint of the architecture expresses,
    so it is refused rather than written wrong. cdq's transforms (hadamard, awq) are all merged."""
    transform = table.get("transform")
    if transform is None:
        return {"name": "none"}
    runtime = transform.get("runtime_ops") if isinstance(transform, Mapping) else None
    if not isinstance(transform, Mapping) or not isinstance(transform.get("name"), str):
        raise ExportError(f"the folder's {MARKER} records a transform cdq cannot read: {transform!r}")
    if not (isinstance(runtime, str) and runtime.startswith("none")):
        raise ExportError(
            f"the model was transformed with {transform['name']!r}, which needs operations at inference "
            f"time ({runtime!r}); a {fmt} checkpoint cannot express them"
        )
    return dict(transform)


def refuse_same_folder(source: Path, dest: Path, fmt: str) -> None:
    """Where an export may not go, whatever ``--overwrite`` says: its own source folder or a folder
    inside it, or a folder cdq wrote that is not an export (a ``cdq quantize`` output)."""
    from .files import manifest_kind
    from .names import EXPORT

    source, dest = Path(source).absolute(), Path(dest).absolute()
    if dest == source:
        raise ExportError(
            f"the {fmt} export needs its own folder (--output must differ from the folder it exports)"
        )
    if source.resolve() in dest.resolve().parents:
        raise ExportError(f"refusing to write the {fmt} export to {dest}: it is inside {source}, its source")
    if dest.is_dir() and manifest_kind(dest) not in (None, EXPORT):
        raise ExportError(
            f"refusing to replace {dest}: it is a cdq quantize output folder, not an export; "
            "choose another --output"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the folder (missing: empty)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def rounded_experts(report: Mapping[str, Any]) -> list[str]:
    """The experts (``NAME[e]`` rows of report.json) that no calibration token reached, so that
    the run rounded them to nearest (RTN) rather than solving them; an export says so too."""
    rows = report.get("layers") if isinstance(report, Mapping) else None
    return [
        str(row["name"])
        for row in rows or []
        if isinstance(row, Mapping)
        and str(row.get("name", "")).endswith("]")
        and row.get("tokens") == 0
        and row.get("method") == "rtn"
    ]


def rounded_note(names: list[str]) -> str:
    """The summary's words for :func:`rounded_experts` (empty when there are none)."""
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"; {len(names)} expert matrices got no calibration tokens and were rounded to nearest "
        f"(RTN, flagged in report.json): {shown}"
    )


def copy_companions(source: Path, dest: Path) -> None:
    """Tokenizer, generation config, report.json...: every visible file that is not the weights,
    the quantization table or config.json (which the export rewrites)."""
    for item in sorted(source.iterdir()):
        if item.is_file() and not _weights_file(item.name) and item.name not in _NOT_COPIED:
            if not item.name.startswith("."):
                shutil.copy2(item, dest / item.name)


def _weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == WEIGHTS_INDEX
