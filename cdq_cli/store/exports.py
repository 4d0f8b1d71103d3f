"""The export formats: one :class:`~cdq_cli.store.exporting.ExportFormat` entry per format, and the
dispatch the run and the command line use, so they name a format, never a module.

``cdq quantize --format F`` writes the native folder and then its export to ``<output><suffix>``;
``cdq export OUT --format F`` writes the export of a finished folder. Adding a format is its module
(declaring ``FORMAT = ExportFormat(...)``) plus one entry in :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from . import compressed, gguf, gptq
from .exporting import ExportError, ExportFormat, ExportSummary, PlannedLayers

__all__ = ["FORMATS", "ExportError", "ExportFormat", "default_dest", "export", "find_format", "preflight"]

FORMATS: dict[str, ExportFormat] = {fmt.name: fmt for fmt in (gptq.FORMAT, compressed.FORMAT, gguf.FORMAT)}


def find_format(name: str) -> ExportFormat:
    """The declared format called ``name``; one line naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}: choose {' or '.join(FORMATS)}") from None


def default_dest(source: Path | str, fmt: str) -> Path:
    """Where ``cdq quantize --format`` puts the export: ``<OUTPUT_DIR><suffix>``."""
    return find_format(fmt).default_dest(source)


def preflight(
    fmt: str,
    layers: PlannedLayers,
    *,
    skipped: Sequence[str],
    method: str,
    model_type: str | None = None,
    kept: Sequence[str] = (),
) -> None:
    """Refuse, before any work, what format ``fmt`` cannot hold: ``layers`` are the layers the run
    will quantize (full name -> (weight shape, grid)), ``skipped`` the --skip patterns, ``kept``
    the quantizable layers they keep in full precision (full names), ``model_type`` the model's
    (config.json), which names fused experts in checkpoints."""
    chosen = find_format(fmt)
    if not layers:
        raise ExportError(f"--format {fmt} needs quantized layers: this run quantizes none")
    chosen.preflight(layers, skipped=skipped, method=method, model_type=model_type, kept=kept)


def export(
    fmt: str,
    source: Path | str,
    dest: Path | str | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    options: Mapping[str, str | None] | None = None,
) -> ExportSummary:
    """Write the ``fmt`` export of the cdq output folder ``source`` (to its default folder when
    ``dest`` is None); return its summary. ``options`` are the format's own (None: not given). The
    export's folder is locked while it is written: a second export (or run) to it fails at once."""
    from .files import check_location, output_lock

    chosen = find_format(fmt)
    for key, value in (options or {}).items():
        if value is not None and key not in chosen.options:
            owners = " and ".join(name for name, other in FORMATS.items() if key in other.options)
            raise ExportError(f"--{key.replace('_', '-')} is an option of the {owners} export, not of {fmt}")
    checked = chosen.check_options(options or {})
    source = Path(source).absolute()
    dest = Path(dest).absolute() if dest is not None else chosen.default_dest(source)
    check_location(dest)  # before the lock, whose file goes beside it
    with output_lock(dest):
        return chosen.export(source, dest, overwrite=overwrite, max_shard_bytes=max_shard_bytes, **checked)
