"""The report schema (report.json): run settings, one row per quantized layer, and a summary.

Everything a reader needs to reproduce or compare a run is here: method and grid, solver options,
the calibration source and its hash, library versions, device and command line. A run hands over
one :class:`~cdq_cli.records.RunRecord`; :func:`render` makes the whole report from it, once. The
settings are described by :meth:`~cdq_cli.records.Settings.describe`, the same description the
output folder's quantization table (:func:`table_entries`) and the resume fingerprint use.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..records import LayerRow, RunRecord, Settings
from .names import REPORT

SCHEMA = "cdq-report/1"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import transformers

    return {
        "cdq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def environment() -> dict[str, Any]:
    """What else changes floating-point results on the same inputs: threads, platform, determinism."""
    return {
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak device memory on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "cpu maxrss", "bytes": int(kib) * (1 if sys.platform == "darwin" else 1024)}


def summarize(rows: Sequence[LayerRow], wall_seconds: float, memory: dict[str, Any]) -> dict[str, Any]:
    """Totals over layers; ``geomean_error_vs_rtn`` < 1 means the method beat RTN on average."""
    ratios = [max(r.error, 1e-300) / r.rtn_error for r in rows if r.rtn_error]
    return {
        "layers": len(rows),
        "total_error": sum(r.error for r in rows),
        "mean_relative_error": sum(r.relative_error for r in rows) / len(rows) if rows else None,
        "geomean_error_vs_rtn": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "outliers": sum(r.outliers for r in rows),
        "wall_seconds": round(wall_seconds, 3),
        "peak_memory_bytes": memory["bytes"],
        "peak_memory_kind": memory["kind"],
    }


def render(record: RunRecord) -> dict[str, Any]:
    """The whole report of a run, as a JSON-ready dict."""
    described = record.settings.describe()
    run: dict[str, Any] = {
        "model": record.model,
        "family": record.family,
        "dtype": record.dtype,
        "compute_dtype": record.compute_dtype or record.dtype,
        **table_entries(record.settings),
        "per_layer": described["per_layer"],
        "overrides": described.get("overrides", []),  # --skip / --layer, in order
        "seed": record.seed,
        "options": _json_options(described["options"]),
        "true_sequential": described["true_sequential"],
        "fp_inputs": described["fp_inputs"],
        "target": record.settings.target,
        **({"fp_share": described["fp_share"]} if "fp_share" in described else {}),
        "transform": record.transform or {"name": "none"},
        "sigma_dtype": described["sigma_dtype"],
        "calibration": record.calibration,
        "versions": versions(),
        "device": device_name(record.settings.device),
        "environment": environment(),
        "command": record.command,
        "started": record.started,
        "ended": record.ended,
        "batch_size": record.batch_size,
        "config": record.config,
        "parallel": record.parallel,
    }
    if record.resumed_blocks is not None:
        run["resumed_blocks"] = record.resumed_blocks
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "run": run,
        "layers": [row.to_dict() for row in record.rows],
        "summary": summarize(record.rows, record.wall_seconds, record.peak_memory),
        **record.sections,
    }
    if record.unquantized:  # named, never skipped in silence
        report["not_quantized"] = {
            "why": "not a Linear, Conv2d or fused-experts layer (e.g. a router): kept in full precision",
            "layers": record.unquantized,
        }
    if record.evaluation is not None:
        report["evaluation"] = record.evaluation
    return report


def table_entries(settings: Settings) -> dict[str, Any]:
    """What the report's run section and the output folder's quantization table both say of the
    grid: method, bits, group size, symmetry (from :meth:`Settings.describe`), and a GGUF run's
    ``--type``."""
    described = settings.describe()
    entries = {key: described[key] for key in ("method", "bits", "group_size", "sym")}
    if settings.gguf_type is not None:
        entries["gguf_type"] = settings.gguf_type
    return entries


def write(folder: Path, report: dict[str, Any]) -> None:
    """report.json in ``folder`` (strict JSON: a NaN is an error, never written)."""
    (Path(folder) / REPORT).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _json_options(options: dict[str, Any]) -> dict[str, Any]:
    """Solver options as JSON values (comma-list options are tuples in memory)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
