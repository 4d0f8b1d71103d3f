"""Commands that work on finished output folders: ``cdq export``, ``cdq report``, ``cdq compare``.

Registered on the main Typer app by :mod:`cdq_cli.cli`; errors are ``ValueError``s, which the app's
``main`` turns into one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import typer

from ..run.plan import CheckpointFormat, ExportTarget, GGUFType
from ..store.exports import FORMATS
from ..store.names import REPORT_PLOT
from .printing import print_json


def export(
    output_dir: Path = typer.Argument(..., help="A cdq output folder (from cdq quantize)."),
    target: ExportTarget = typer.Option(
        ExportTarget("gptq"),
        "--format",
        help="Target layout: "
        + "; ".join(f"{name}: {fmt.description}" for name, fmt in FORMATS.items())
        + ".",
    ),
    dest: Path | None = typer.Option(
        None,
        "--output",
        "--dest",
        metavar="FOLDER",
        help="Export folder (default: "
        + ", ".join(f"<OUTPUT_DIR>{fmt.suffix}" for fmt in FORMATS.values())
        + ").",
    ),
    gguf_type: GGUFType | None = typer.Option(  # type: ignore[valid-type]
        None,
        "--type",
        metavar="T",
        help="GGUF only: the run's --type (the default; another is refused).",
    ),
    checkpoint_format: CheckpointFormat | None = typer.Option(
        None,
        help="GPTQ only. gptq (default): v1, zero-points stored minus 1 (read by every engine); "
        "gptq_v2: gptqmodel only.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Write the quantized model in another checkpoint layout: GPTQ (qweight/qzeros/scales/g_idx),
    compressed-tensors pack-quantized (what llm-compressor writes and vLLM serves) or GGUF (one file
    for llama.cpp, Ollama, LM Studio; from a cdq quantize --format gguf --type T run)."""
    from ..store.exports import export as run_export

    summary = run_export(
        target.value,
        output_dir,
        dest,
        overwrite=overwrite,
        options={
            "checkpoint_format": checkpoint_format.value if checkpoint_format is not None else None,
            "type": gguf_type.value if gguf_type is not None else None,
        },
    )
    show_export(summary.to_dict(), as_json=as_json)


def show_export(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    print(f"wrote {summary['output']}: {summary['headline']}")
    print(f"runs in: {summary['engines']}")


def report(
    output_dir: Path = typer.Argument(..., help="A cdq output folder or its report.json."),
    top: int = typer.Option(20, help="Show the N worst layers (0: all)."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG path (default: OUTPUT_DIR/report.png)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Do not write the PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Summary and worst layers of one run; writes a PNG of relative error per layer and per block."""
    from .report_view import load_report, render, report_payload, report_table, summary_lines

    if top < 0:
        raise ValueError(f"--top must be 0 (all) or positive, got {top}")
    data = load_report(output_dir)
    picture = None
    if not no_plot and data["layers"]:
        picture = _plot_to(data, plot) if plot is not None else _plot_beside(data, output_dir)
    if as_json:
        print_json({**report_payload(data, top or None), "plot": str(picture) if picture else None})
        return
    header, body = report_table(data, top or None)
    lines = summary_lines(data)
    shown = f"worst {len(body)} of {len(data['layers'])} layers by relative error"
    render([*lines, shown], header, body, sys.stdout)
    if picture is not None:
        print(f"plot: {picture}")


def _plot_beside(data: dict, output_dir: Path) -> Path:
    """Write the plot into the run's folder, as a file cdq wrote (never over a file it did not)."""
    from ..store.files import add_to_manifest, read_manifest

    folder = output_dir if output_dir.is_dir() else output_dir.parent
    dest = folder / REPORT_PLOT
    written = read_manifest(folder)
    if dest.exists() and (written is None or REPORT_PLOT not in written):
        raise ValueError(f"refusing to overwrite {dest}, which cdq did not write (pass --plot PATH)")
    picture = _write_plot(data, dest)
    add_to_manifest(folder, REPORT_PLOT)
    return picture


def _plot_to(data: dict, dest: Path) -> Path:
    """Write the plot where ``--plot`` says: never over a file that is not a plot cdq wrote, never
    over a file a cdq folder's manifest lists (its weights, its report), never into a folder name."""
    from ..store.files import add_to_manifest, read_manifest
    from .report_view import is_cdq_plot

    dest = dest.expanduser().absolute()
    if dest.is_dir():
        raise ValueError(f"--plot {dest} is a folder: name the PNG file to write")
    listed = read_manifest(dest.parent) or set()
    ours = is_cdq_plot(dest)
    if dest.name in listed and not ours and dest.name != REPORT_PLOT:
        raise ValueError(f"refusing to overwrite {dest}: it is a file of the cdq folder {dest.parent}")
    if (dest.exists() or dest.is_symlink()) and not ours and dest.name not in listed:
        raise ValueError(f"refusing to overwrite {dest}, which is not a plot cdq wrote (choose another PATH)")
    picture = _write_plot(data, dest)
    add_to_manifest(dest.parent, dest.name)  # a plot put into a cdq folder is listed as cdq's
    return picture


def _write_plot(data: dict, dest: Path) -> Path:
    """The PNG at ``dest``; a destination that cannot be written (read-only, full, not a folder) is
    one line, exit 2, checked before the picture is drawn where it can be."""
    from ..store.files import check_location
    from .report_view import write_plot

    check_location(dest)
    try:
        return write_plot(data, dest)
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise ValueError(f"cannot write the plot {dest}: {reason}") from None


def compare(
    a: Path = typer.Argument(..., help="First cdq output folder (or report.json): the baseline."),
    b: Path = typer.Argument(..., help="Second cdq output folder (or report.json)."),
    top: int = typer.Option(20, help="Show the N layers where B is worst relative to A (0: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Two runs side by side: per-layer errors matched by name, ratio B/A, and both evaluations."""
    from .report_view import compare_lines, compare_payload, compare_table, load_report, render

    if top < 0:
        raise ValueError(f"--top must be 0 (all) or positive, got {top}")
    payload = compare_payload(load_report(a), load_report(b), top or None)
    if as_json:
        print_json(payload)
        return
    header, body = compare_table(payload)
    render(compare_lines(payload), header, body, sys.stdout)
