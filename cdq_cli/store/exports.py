"""What every export of a cdq output folder shares: the formats and where each goes, the error they
raise, and the companion files (tokenizer, report) copied beside the weights.

``cdq quantize --format F`` writes the native folder and then its export to ``<output><suffix>``;
``cdq export OUT --format F`` writes the export of a finished folder. The formats live in their
own modules (:mod:`.gptq`, :mod:`.compressed`); this module dispatches to them, so the run and the
command line name a format, never a module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..solvers import GridSpec
from .names import MARKER, WEIGHTS, WEIGHTS_INDEX

# format -> the suffix of its default folder, next to the native one
FORMATS = {"gptq": "-gptq", "compressed-tensors": "-ct"}
_NOT_COPIED = {WEIGHTS, MARKER, "config.json"}


class ExportError(ValueError):
    """What an export format cannot hold; one line for the CLI (exit 2)."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose {' or '.join(FORMATS)}")
    return fmt


def default_dest(source: Path, fmt: str = "gptq") -> Path:
    """``<OUTPUT_DIR>-gptq`` / ``<OUTPUT_DIR>-ct``, a sibling of the native folder (which stays:
    report, resume, cdq eval read it)."""
    source = Path(source).absolute()
    return source.with_name(f"{source.name}{FORMATS[check_format(fmt)]}")


def preflight(
    fmt: str,
    layers: Mapping[str, tuple[tuple[int, ...], GridSpec]],
    *,
    skipped: Sequence[str],
    method: str,
) -> None:
    """Refuse, before any work, what format ``fmt`` cannot hold: ``layers`` are the layers the run
    will quantize (full name -> (weight shape, grid)), ``skipped`` those --skip keeps in full
    precision."""
    if not layers:
        raise ExportError(f"--format {fmt} needs quantized layers: this run quantizes none")
    if check_format(fmt) == "gptq":
        from .gptq import preflight as gptq_preflight

        gptq_preflight(layers, skipped=skipped, method=method)
    else:
        from .compressed import preflight as ct_preflight

        ct_preflight(layers, method=method)


def export(
    fmt: str,
    source: Path | str,
    dest: Path | str | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    checkpoint_format: str = "gptq",
) -> Any:
    """Write the ``fmt`` export of the cdq output folder ``source``; return its summary (an object
    with ``to_dict()`` and ``engines``). The export's folder is locked while it is written: a second
    export (or run) to the same folder fails at once."""
    from .files import check_location, output_lock

    dest = Path(dest).absolute() if dest is not None else default_dest(Path(source), fmt)
    if checkpoint_format != "gptq" and check_format(fmt) != "gptq":
        raise ExportError("--checkpoint-format is a GPTQ option; compressed-tensors has one layout")
    check_location(dest)  # before the lock, whose file goes beside it
    with output_lock(dest):
        if check_format(fmt) == "gptq":
            from .gptq import export_gptq

            return export_gptq(
                source,
                dest,
                checkpoint_format=checkpoint_format,
                overwrite=overwrite,
                max_shard_bytes=max_shard_bytes,
            )
        from .compressed import export_compressed

        return export_compressed(source, dest, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


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


def copy_companions(source: Path, dest: Path) -> None:
    """Tokenizer, generation config, report.json...: every visible file that is not the weights,
    the quantization table or config.json (which the export rewrites)."""
    for item in sorted(source.iterdir()):
        if item.is_file() and not _weights_file(item.name) and item.name not in _NOT_COPIED:
            if not item.name.startswith("."):
                shutil.copy2(item, dest / item.name)


def _weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == WEIGHTS_INDEX
