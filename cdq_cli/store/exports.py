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
FORMATS = {"gptq": "-gptq", "compressed-tensors": "-ct", "gguf": "-gguf"}
_NOT_COPIED = {WEIGHTS, MARKER, "config.json"}


class ExportError(ValueError):
    """What an export format cannot hold; one line for the CLI (exit 2)."""


def refuse_gguf_grids(specs: Mapping[str, GridSpec], fmt: str) -> None:
    """A layer on a GGUF type's grid (block scales, offsets) fits no other export format."""
    for name, spec in specs.items():
        if spec.block_type is not None:
            raise ExportError(
                f"{name} is on the GGUF grid {spec.block_type}: {fmt} cannot hold it (--format gguf)"
            )


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
    elif fmt == "gguf":
        from .gguf import preflight as gguf_preflight

        gguf_preflight(layers, method=method)
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
    gguf_type: str | None = None,
) -> Any:
    """Write the ``fmt`` export of the cdq output folder ``source``; return its summary (an object
    with ``to_dict()`` and ``engines``). ``gguf_type``: GGUF's ``--type`` (default: the run's)."""
    if gguf_type is not None and check_format(fmt) != "gguf":
        raise ExportError("--type is a GGUF type: use it with --format gguf")
    if check_format(fmt) == "gguf":
        if checkpoint_format != "gptq":
            raise ExportError("--checkpoint-format is a GPTQ option; GGUF has one layout")
        from .gguf import export_gguf

        return export_gguf(source, dest, gguf_type=gguf_type, overwrite=overwrite)
    if check_format(fmt) == "gptq":
        from .gptq import export_gptq

        return export_gptq(
            source,
            dest,
            checkpoint_format=checkpoint_format,
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
        )
    if checkpoint_format != "gptq":
        raise ExportError("--checkpoint-format is a GPTQ option; compressed-tensors has one layout")
    from .compressed import export_compressed

    return export_compressed(source, dest, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def refuse_same_folder(source: Path, dest: Path, fmt: str) -> None:
    if dest == source:
        raise ExportError(
            f"the {fmt} export needs its own folder (--output must differ from the folder it exports)"
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
