"""Reports people read: ``cdq report`` (one run) and ``cdq compare`` (two runs), plus the PNG plot.

Both read report.json (see :mod:`cdq_cli.store.report`). On a terminal they print rich tables; piped or
redirected, a plain fixed-width text table (no colour codes, stable for logs and diffs); ``--json``
prints one JSON object instead. Layers are ordered worst first: by relative error ‖(W−Ŵ)X‖²/‖WX‖²
for one run, by the error ratio B/A for a comparison.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..store.names import REPORT

_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


class ReportError(ValueError):
    """A missing or unreadable report; one line for the CLI (exit 2)."""


def load_report(target: Path | str) -> dict[str, Any]:
    """report.json of a cdq output folder (or the file itself)."""
    path = Path(target)
    if path.is_dir():
        path = path / REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ReportError(f"no report found: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or "layers" not in report or "run" not in report:
        raise ReportError(f"{path} is not a cdq report (no 'run'/'layers')")
    return report


def _no_constant(name: str) -> Any:
    raise ValueError(f"it holds {name}, which is not a number cdq writes")


def block_of(name: str) -> str:
    """The block a layer belongs to: its name up to the first numeric component."""
    found = _BLOCK.match(name)
    return found.group(1) if found else name.rpartition(".")[0] or name


def rtn_ratio(row: dict[str, Any]) -> float | None:
    rtn = row.get("rtn_error")
    return row["error"] / rtn if rtn else None


def worst_layers(report: dict[str, Any], top: int | None) -> list[dict[str, Any]]:
    rows = sorted(report["layers"], key=lambda r: r.get("relative_error", 0.0), reverse=True)
    return rows if not top else rows[:top]


def per_block(report: dict[str, Any]) -> list[tuple[str, float]]:
    """(block, mean relative error) in model order."""
    sums: dict[str, list[float]] = {}
    for row in report["layers"]:
        sums.setdefault(block_of(row["name"]), []).append(row.get("relative_error", 0.0))
    return [(block, sum(values) / len(values)) for block, values in sums.items()]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The header: what ran, on what, and how well (one fact per line)."""
    run, summary = report["run"], report.get("summary", {})
    grid = f"w{run.get('bits')}" + (f"g{run['group_size']}" if run.get("group_size") else "")
    grid += " sym" if run.get("sym") else " asym"
    grid += " per-layer" if run.get("per_layer") else ""
    if run.get("gguf_type"):
        grid = f"GGUF {run['gguf_type']} (llama.cpp's per-tensor types)"
    lines = [
        f"model: {run.get('model')} ({run.get('family', '?')}, {run.get('dtype', '?')})",
        f"method: {run.get('method')} {grid}" + (f" options {run['options']}" if run.get("options") else ""),
        f"layers: {summary.get('layers', len(report['layers']))}, "
        f"mean relative error {_num(summary.get('mean_relative_error'))}, "
        f"error vs RTN (geomean) {_num(summary.get('geomean_error_vs_rtn'), '.3f')}x, "
        f"outliers {summary.get('outliers', 0)}",
    ]
    calib = run.get("calibration") or {}
    if calib:
        lines.append(
            f"calibration: {calib.get('source')} {calib.get('nsamples')} x {calib.get('seqlen')} "
            f"(seed {calib.get('seed')}), device {run.get('device')}, "
            f"{_num(summary.get('wall_seconds'), '.1f')}s"
        )
    evaluation = report.get("evaluation")
    if evaluation:
        lines.append("evaluation: " + _evaluation_text(evaluation))
    return lines


def report_payload(report: dict[str, Any], top: int | None) -> dict[str, Any]:
    """``cdq report --json``: the summary, per-block means and the worst layers."""
    return {
        "run": report["run"],
        "summary": report.get("summary", {}),
        "evaluation": report.get("evaluation"),
        "blocks": [{"block": b, "mean_relative_error": e} for b, e in per_block(report)],
        "worst_layers": [{**row, "error_vs_rtn": rtn_ratio(row)} for row in worst_layers(report, top)],
    }


def report_table(report: dict[str, Any], top: int | None) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "shape", "error", "rel. err", "err/RTN", "time s", "outliers"]
    body = [
        [
            row["name"],
            "x".join(str(d) for d in row.get("shape", [])),
            _num(row.get("error")),
            _num(row.get("relative_error")),
            _num(rtn_ratio(row), ".3f"),
            _num(row.get("seconds"), ".2f"),
            str(row.get("outliers", 0)),
        ]
        for row in worst_layers(report, top)
    ]
    return header, body


def compare_payload(a: dict[str, Any], b: dict[str, Any], top: int | None) -> dict[str, Any]:
    """Per-layer errors matched by name, ratio B/A (worst first), and both summaries."""
    rows_a = {row["name"]: row for row in a["layers"]}
    rows_b = {row["name"]: row for row in b["layers"]}
    matched = []
    for name, ra in rows_a.items():
        rb = rows_b.get(name)
        if rb is None:
            continue
        ratio = rb["error"] / ra["error"] if ra["error"] > 0 else None
        matched.append(
            {
                "name": name,
                "relative_error_a": ra.get("relative_error"),
                "relative_error_b": rb.get("relative_error"),
                "error_a": ra["error"],
                "error_b": rb["error"],
                "ratio_b_over_a": ratio,
            }
        )
    ratios = [m["ratio_b_over_a"] for m in matched if m["ratio_b_over_a"]]
    ordered = sorted(matched, key=lambda m: m["ratio_b_over_a"] or 0.0, reverse=True)
    return {
        "a": _side(a),
        "b": _side(b),
        "matched_layers": len(matched),
        "only_in_a": sorted(set(rows_a) - set(rows_b)),
        "only_in_b": sorted(set(rows_b) - set(rows_a)),
        "geomean_ratio_b_over_a": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "b_better_layers": sum(1 for r in ratios if r < 1),
        "evaluation": _compare_evaluation(a.get("evaluation"), b.get("evaluation")),
        "layers": ordered if not top else ordered[:top],
    }


def compare_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "rel. err A", "rel. err B", "B/A"]
    body = [
        [
            m["name"],
            _num(m["relative_error_a"]),
            _num(m["relative_error_b"]),
            _num(m["ratio_b_over_a"], ".3f"),
        ]
        for m in payload["layers"]
    ]
    return header, body


def compare_lines(payload: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("a", "b"):
        side = payload[key]
        lines.append(
            f"{key.upper()}: {side['label']}: mean relative error {_num(side['mean_relative_error'])}, "
            f"vs RTN {_num(side['geomean_error_vs_rtn'], '.3f')}x"
        )
    lines.append(
        f"matched {payload['matched_layers']} layers: error B/A geomean "
        f"{_num(payload['geomean_ratio_b_over_a'], '.3f')}x, B better on {payload['b_better_layers']}"
    )
    for key in ("a", "b"):
        if payload[f"only_in_{key}"]:
            lines.append(f"{len(payload[f'only_in_{key}'])} layers only in {key.upper()}")
    for metric, values in (payload["evaluation"] or {}).items():
        lines.append(
            f"{metric}: A {_num(values['a'], '.4f')}  B {_num(values['b'], '.4f')}  "
            f"(B/A {_num(values['ratio'], '.4f')})"
        )
    return lines


def render(
    title_lines: Sequence[str], header: Sequence[str], body: Sequence[Sequence[str]], stream: TextIO
) -> None:
    """A rich table on a terminal, a plain fixed-width table otherwise."""
    if stream.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = Console(file=stream, highlight=False)
        for line in title_lines:
            console.print(line, markup=False)
        prefix = _common_prefix([row[0] for row in body])
        if prefix:  # a narrow terminal keeps the part of the names that differs
            console.print(f"layer names below are under {prefix}", markup=False)
            body = [[row[0][len(prefix) :], *row[1:]] for row in body]
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column(header[0], justify="left", overflow="fold")  # only names fold; numbers stay whole
        for name in header[1:]:
            table.add_column(name, justify="right", no_wrap=True)
        for row in body:
            table.add_row(*row)
        console.print(table)
        return
    for line in title_lines:
        print(line, file=stream)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body, strict=False)]
    for cells in (header, ["-" * w for w in widths], *body):
        text = "  ".join(
            str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )
        print(text.rstrip(), file=stream)


def _common_prefix(names: Sequence[str]) -> str:
    """The longest shared prefix of ``names`` that ends at a dot ("" for fewer than two names)."""
    if len(names) < 2:
        return ""
    shared = os.path.commonprefix(list(names))
    return shared[: shared.rfind(".") + 1]


def write_plot(report: dict[str, Any], dest: Path) -> Path:
    """PNG: relative error per layer (and RTN's on the same Σ), and mean relative error per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    if not rows:
        raise ReportError("the report has no quantized layers to plot (--bits 16?)")
    rel = [max(row.get("relative_error", 0.0), 1e-12) for row in rows]
    rtn = [
        r * (row["rtn_error"] / row["error"]) if row.get("rtn_error") and row["error"] > 0 else None
        for r, row in zip(rel, rows, strict=True)
    ]
    blocks = per_block(report)
    run = report["run"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, min(24.0, len(rows) * 0.12)), 7.5))
    xs = list(range(len(rows)))
    top.plot(xs, rel, marker=".", linewidth=1, label=str(run.get("method")))
    if any(v is not None for v in rtn):
        shown = [(x, v) for x, v in zip(xs, rtn, strict=True) if v is not None]
        top.plot(*zip(*shown, strict=True), linestyle="--", linewidth=0.8, color="gray", label="rtn (same Σ)")
    top.set_yscale("log")
    top.set_xlabel("layer (model order)")
    top.set_ylabel("relative error ‖(W−Ŵ)X‖²/‖WX‖²")
    top.legend(loc="best", fontsize=8)
    top.grid(True, which="both", alpha=0.3)
    grid = f"w{run.get('bits')}" + (f"g{run['group_size']}" if run.get("group_size") else "")
    top.set_title(f"{Path(str(run.get('model'))).name}: {run.get('method')} {grid}")
    bottom.bar(range(len(blocks)), [e for _, e in blocks], color="tab:orange")  # linear: bars from 0
    bottom.set_xlabel("block")
    bottom.set_ylabel("mean relative error")
    step = max(1, len(blocks) // 30)
    bottom.set_xticks(range(0, len(blocks), step))
    bottom.set_xticklabels([str(i) for i in range(0, len(blocks), step)])
    bottom.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", suffix=".png", dir=dest.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": PLOT_SOFTWARE})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with open(tmp, "rb") as fh:  # on disk before it takes the name: never a partial picture
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return dest


PLOT_SOFTWARE = "cdq report"  # the PNG's "Software" text: how cdq knows a plot it wrote


def is_cdq_plot(path: Path) -> bool:
    """True for a PNG file whose ``Software`` text chunk says cdq wrote it (:func:`write_plot`)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return False
                size, tag = int.from_bytes(head[:4], "big"), head[4:]
                if tag in (b"IDAT", b"IEND") or size > 1 << 20:
                    return False
                body = fh.read(size)
                fh.read(4)  # CRC
                if tag == b"tEXt" and body == b"Software\x00" + PLOT_SOFTWARE.encode():
                    return True
    except OSError:
        return False


def _side(report: dict[str, Any]) -> dict[str, Any]:
    run, summary = report["run"], report.get("summary", {})
    grid = f"w{run.get('bits')}" + (f"g{run['group_size']}" if run.get("group_size") else "")
    return {
        "label": f"{run.get('method')} {grid} on {Path(str(run.get('model'))).name}",
        "mean_relative_error": summary.get("mean_relative_error"),
        "geomean_error_vs_rtn": summary.get("geomean_error_vs_rtn"),
        "layers": len(report["layers"]),
    }


def _compare_evaluation(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Metrics both runs evaluated (perplexity, top-1, agreement...), with B/A."""
    if not a or not b:
        return None
    shared = {}
    for key in ("ppl", "fp_ppl", "top1", "top5", "agreement"):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            shared[key] = {"a": va, "b": vb, "ratio": vb / va if va else None}
    return shared or None


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    parts = [f"{evaluation.get('data', '?')}"]
    for key in ("ppl", "fp_ppl", "top1", "top5", "agreement"):
        value = evaluation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)
