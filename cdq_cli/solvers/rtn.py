"""Round-to-nearest: every weight to its nearest point of the min–max grid. The baseline."""

from __future__ import annotations

import math
import time

import torch

from . import gguf
from .grid import Grid, GridSpec, fit_minmax
from .result import QuantResult, working_objective


def solve_rtn(
    weight: torch.Tensor, sigma: torch.Tensor | None, spec: GridSpec, *, grid: Grid | None = None
) -> QuantResult:
    """Every weight to its nearest point of ``grid`` (default: the min–max grid of ``spec``, or for
    a GGUF block type llama.cpp's own reference choice, :func:`.gguf.fit`).

    Ŵ never depends on Σ (the method declares ``needs_sigma`` False): Σ only gives the reported
    objective ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)``. With ``sigma`` None the objective is NaN, left to the
    caller, which measures ``‖(W − Ŵ) X‖²`` from the inputs X themselves (the driver does, in the
    block's one forward pass: rows·columns per token instead of Σ's columns² per token and the
    objective's 2·rows·columns²)."""
    began = time.perf_counter()
    if grid is None:
        grid = (
            fit_minmax(weight, spec)
            if spec.block_type is None
            else gguf.fit(weight, spec).to(weight.device, weight.dtype)
        )
    codes = grid.quantize(weight)
    approx = grid.dequantize(codes)
    value = math.nan if sigma is None else working_objective(weight, approx, sigma)
    return QuantResult("rtn", approx, codes, grid, value, value, seconds=time.perf_counter() - began)
