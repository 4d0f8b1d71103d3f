"""Round-to-nearest: every weight to its nearest point of the min–max grid. The baseline."""

from __future__ import annotations

import time

import torch

from .grid import Grid, GridSpec, fit_minmax
from .result import QuantResult, working_objective


def solve_rtn(
    weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, *, grid: Grid | None = None
) -> QuantResult:
    """Every weight to its nearest point of ``grid`` (default: the min–max grid of ``spec``)."""
    began = time.perf_counter()
    grid = fit_minmax(weight, spec) if grid is None else grid
    codes = grid.quantize(weight)
    approx = grid.dequantize(codes)
    value = working_objective(weight, approx, sigma)
    return QuantResult("rtn", approx, codes, grid, value, value, seconds=time.perf_counter() - began)
