"""The report schema (report.json): run settings, one row per quantized layer, and a summary.

Everything a reader needs to reproduce or compare a run is here: method and grid, solver options,
the calibration source and its hash, library versions, device and command line. Rows are
:class:`cdq_cli.records.LayerRow`; the summary is derived from them.
"""

from __future__ import annotations

import math
import platform
import resource
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from .. import __version__
from ..records import LayerRow, Settings

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


def build(
    *,
    model: str,
    family: str,
    dtype: str,
    settings: Settings,
    seed: int,
    calibration: dict[str, Any],
    rows: Sequence[LayerRow],
    device: torch.device,
    command: str,
    started: str,
    ended: str,
    wall_seconds: float,
) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    return {
        "schema": SCHEMA,
        "run": {
            "model": model,
            "family": family,
            "dtype": dtype,
            "method": settings.method if settings.quantizing else "none",
            "bits": settings.bits,
            "group_size": settings.group_size,
            "sym": settings.sym,
            "per_layer": settings.per_layer,
            "overrides": [rule.describe() for rule in settings.overrides],  # --skip / --layer, in order
            **({"gguf_type": settings.gguf_type} if settings.gguf_type is not None else {}),
            "seed": seed,
            "options": _json_options(settings.options),
            "true_sequential": settings.true_sequential,
            "fp_inputs": settings.fp_inputs,
            "sigma_dtype": str(settings.sigma_dtype).removeprefix("torch."),
            "calibration": calibration,
            "versions": versions(),
            "device": device_name(device),
            "environment": environment(),
            "command": command,
            "started": started,
            "ended": ended,
        },
        "layers": [row.to_dict() for row in rows],
        "summary": summarize(rows, wall_seconds, peak_memory(device)),
    }


def _json_options(options: dict[str, Any]) -> dict[str, Any]:
    """Solver options as JSON values (comma-list options are tuples in memory)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
