"""COMQ (Zhang et al., arXiv 2403.07134): CD over bit-codes and scales, Ŵ = δ ⊙ (Q − z).

The grid starts from the weights' min–max range with its scale multiplied by λ (``scalar``);
each outer iteration updates the codes by CD in the greedy order (per row, decreasing
``|w_ij|·‖x_j‖``) and then the scales in closed form, ``δ_i = q̃_iᵀ Σ w_i / q̃_iᵀ Σ q̃_i`` (per layer:
sums over rows), with ``q̃ = Q − z``. Per-channel (δ per row; per group with a group size) or
per-layer (one δ) via the grid spec. Both steps are exact minimisations, so the objective is
monotone after the first sweep.

On a GGUF block type's grid (``grid`` given) the start is that grid (λ does not apply: the stored
scales have fixed widths) and the scale update is the type's own refit (:func:`.gguf.refit`, scales
rounded to their stored widths), kept only when it lowers the objective.
"""

from __future__ import annotations

import time

import torch

from . import gguf
from .cd import cd_sweeps, order_permutation
from .grid import Grid, GridSpec, fit_minmax
from .lsq import refit_scales
from .result import QuantResult, check_finite, working_objective
from .starts import start_point


def solve_comq(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    scalar: float = 1.0,
    iterations: int = 3,
    sweeps: int = 1,
    order: str = "greedy",
    update_scales: bool = True,
    start: str = "weight",
    block_size: int = 128,
    damping: float = 0.01,
    grid: Grid | None = None,
) -> QuantResult:
    if scalar <= 0:
        raise ValueError(f"COMQ scalar λ must be positive, got {scalar}")
    if iterations < 1:
        raise ValueError("COMQ needs at least one outer iteration")
    began = time.perf_counter()
    if grid is None:
        base = fit_minmax(weight, spec)
        grid = Grid(spec, base.scale * scalar, base.zero.clone())
    approx, grid = start_point(start, weight, sigma, spec, grid, damping=damping)
    start_value = working_objective(weight, grid.round(approx) if start == "weight" else approx, sigma)
    perm = order_permutation(order, weight, sigma)
    history: list[float] = []
    total = 0
    wsigma = weight @ sigma if update_scales else None  # the same for every scale refit
    for _ in range(iterations):
        approx, log = cd_sweeps(weight, sigma, grid, approx, sweeps=sweeps, order=perm, block_size=block_size)
        total += log.sweeps
        codes = grid.quantize(approx)
        if update_scales and grid.spec.block_type is not None:
            candidate = gguf.refit(weight, sigma, grid, codes, wsigma=wsigma)
            moved = candidate.dequantize(codes)
            if working_objective(weight, moved, sigma) < working_objective(
                weight, grid.dequantize(codes), sigma
            ):
                grid, approx = candidate, moved
        elif update_scales:
            grid = refit_scales(weight, sigma, grid, codes, wsigma=wsigma)
            approx = grid.dequantize(codes)
        history.append(working_objective(weight, approx, sigma))
    codes = grid.quantize(approx)
    approx = grid.dequantize(codes)
    check_finite(approx, "comq")
    return QuantResult(
        "comq",
        approx,
        codes,
        grid,
        working_objective(weight, approx, sigma),
        start_value,
        sweeps=total,
        seconds=time.perf_counter() - began,
        history=history,
    )
