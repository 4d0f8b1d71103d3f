"""Round-to-nearest: every weight to its nearest point of the min–max grid. The baseline."""

from __future__ import annotations

import time

import torch

from . import gguf
from .grid import Grid, GridSpec, fit_minmax
from .result import QuantResult, working_objective


def solve_rtn(
    weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, *, grid: Grid | None = None
) -> QuantResult:
    """Every weight to its nearest point of ``grid`` (default: the min–max grid of ``spec``, or for
    a GGUF block type llama.cpp's own reference choice, :func:`.gguf.fit`)."""
    began = time.perf_counter()
    if grid is None:
        grid = (
            fit_minmax(weight, spec)
            if spec.block_type is None
            else gguf.fit(weight, spec).to(weight.device, weight.dtype)
        )
    codes = grid.quantize(weight)
    approx = grid.dequantize(codes)
    value = working_objective(weight, approx, sigma)
    return QuantResult("rtn", approx, codes, grid, value, value, seconds=time.perf_counter() - began)
