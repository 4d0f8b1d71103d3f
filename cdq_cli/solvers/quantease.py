"""QuantEase (Behdin et al., arXiv 2309.01885): cyclic CD on a fixed GPTQ-style min–max grid.

Two presets of the shared kernel:
* ``paper``: the official code's schedule: start from W, columns by decreasing diag Σ, 30 sweeps,
  sweep k relaxed (no rounding) when k % 3 == 1, except after sweep 25 and the last one.
* ``fast``: start from GPTQ, then rounded sweeps until a fixed point (at most ``sweeps``, default 4).
"""

from __future__ import annotations

import time

import torch

from .cd import cd_sweeps, order_permutation
from .grid import Grid, GridSpec
from .result import QuantResult, check_finite, working_objective
from .starts import start_point

PRESETS = ("paper", "fast")


def paper_relaxed_schedule(sweeps: int) -> list[bool]:
    """Which sweeps the official QuantEase code leaves unrounded."""
    return [k % 3 == 1 and k != sweeps - 1 and k <= 25 for k in range(sweeps)]


def solve_quantease(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    preset: str = "paper",
    sweeps: int | None = None,
    order: str = "diag",
    start: str | None = None,
    relaxed: bool | None = None,
    block_size: int = 128,
    damping: float = 0.01,
    grid: Grid | None = None,
) -> QuantResult:
    """QuantEase; explicit options override the preset's (``damping`` only affects a GPTQ start).
    ``grid``: a fixed grid to work on (a GGUF block type's) instead of the start's own."""
    if preset not in PRESETS:
        raise ValueError(f"unknown QuantEase preset {preset!r}: choose one of {', '.join(PRESETS)}")
    began = time.perf_counter()
    paper = preset == "paper"
    sweeps = sweeps if sweeps is not None else (30 if paper else 4)
    start = start if start is not None else ("weight" if paper else "gptq")
    relaxed = relaxed if relaxed is not None else paper
    approx, grid = start_point(start, weight, sigma, spec, grid, damping=damping)
    start_value = working_objective(weight, grid.round(approx) if start == "weight" else approx, sigma)
    schedule = paper_relaxed_schedule(sweeps) if relaxed else [False] * sweeps
    approx, log = cd_sweeps(
        weight,
        sigma,
        grid,
        approx,
        sweeps=sweeps,
        order=order_permutation(order, weight, sigma),
        relaxed=schedule,
        block_size=block_size,
        stop_at_fixed_point=not relaxed,
        start_objective=0.0 if start == "weight" else start_value,  # a W start has E = 0
    )
    codes = grid.quantize(approx)
    approx = grid.dequantize(codes)
    check_finite(approx, "quantease")
    return QuantResult(
        "quantease",
        approx,
        codes,
        grid,
        working_objective(weight, approx, sigma),
        start_value,
        sweeps=log.sweeps,
        seconds=time.perf_counter() - began,
        history=log.objectives,
    )
