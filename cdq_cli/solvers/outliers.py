"""Outlier-aware QuantEase: W ≈ Ŵ + H with Ŵ on a grid and H sparse, kept in full precision.

Alternates, from a start that puts the largest weights into H:
* a CD sweep on ``W − H`` (the grid is fitted once on ``W − H₀`` so outliers do not stretch it);
* one iterative-hard-thresholding step ``H ← TopK(H − η (Ŵ + H − W) Σ)`` with ``η = 1/λ_max(Σ)``,
  a projected gradient step with step 1/L on f(H) = tr((W − Ŵ − H) Σ (·)ᵀ), which cannot increase
  f because the old H is feasible for the projection.
TopK keeps the ``budget`` entries of largest magnitude (unstructured) or the columns of largest
norm (structured: whole input channels kept in full precision). Both steps are monotone, so the
objective never increases.
"""

from __future__ import annotations

import time

import torch

from .cd import cd_sweeps, order_permutation
from .cdq import DEFAULT_STARTS, best_start, descend
from .grid import GridSpec, fit_minmax
from .result import CHUNK_BYTES, QuantResult, check_finite, working_objective
from .starts import start_point

INNER_SOLVERS = ("cd", "cdq")


def project_sparse(candidate: torch.Tensor, budget: int, structured: bool) -> torch.Tensor:
    """Best approximation of ``candidate`` with ``budget`` nonzero entries (or columns)."""
    out = torch.zeros_like(candidate)
    if budget <= 0:
        return out
    if structured:
        keep = torch.topk(candidate.norm(dim=0), min(budget, candidate.shape[1])).indices
        out[:, keep] = candidate[:, keep]
        return out
    flat = candidate.reshape(-1)
    keep = torch.topk(flat.abs(), min(budget, flat.numel())).indices
    out.view(-1)[keep] = flat[keep]
    return out


def largest_eigenvalue(sigma: torch.Tensor) -> float:
    """λ_max(Σ): in float64 when Σ's float64 copy fits ``CHUNK_BYTES``, otherwise in Σ's own
    precision (at least float32; the step size needs a few digits, not sixteen)."""
    if 8 * sigma.numel() <= CHUNK_BYTES:
        dtype = torch.float64
    else:
        dtype = torch.promote_types(sigma.dtype, torch.float32)
    return float(torch.linalg.eigvalsh(sigma.to(dtype)).max())


def solve_quantease_outlier(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    outlier_fraction: float = 0.01,
    structured: bool = False,
    iterations: int = 10,
    final_sweeps: int = 4,
    order: str = "diag",
    start: str = "rtn",
    block_size: int = 128,
    damping: float = 0.01,
    inner: str = "cd",
) -> QuantResult:
    """``inner`` chooses how ``W − H`` is quantized: ``cd`` (QuantEase: fixed min–max grid, CD
    sweeps) or ``cdq`` (cdq's method: its GPTQ start, and a final descent that also refits
    the grid's scales and zero-points)."""
    if not 0 <= outlier_fraction < 1:
        raise ValueError(f"outlier fraction must be in [0, 1), got {outlier_fraction}")
    if inner not in INNER_SOLVERS:
        raise ValueError(f"unknown inner solver {inner!r} for the outlier-aware method: use cd or cdq")
    began = time.perf_counter()
    rows, columns = weight.shape
    budget = round(outlier_fraction * (columns if structured else rows * columns))
    outliers = project_sparse(weight, budget, structured)
    if inner == "cdq":
        approx, grid, _, _ = best_start(DEFAULT_STARTS, weight - outliers, sigma, spec, damping=damping)
    else:
        grid = fit_minmax(weight - outliers, spec)
        approx, grid = start_point(start, weight - outliers, sigma, spec, grid, damping=damping)
    on_grid = grid.round(approx) if start == "weight" and inner == "cd" else approx
    start_value = working_objective(weight, on_grid + outliers, sigma)
    step = 1.0 / largest_eigenvalue(sigma)
    perm = order_permutation(order, weight, sigma)
    history: list[float] = []
    sweeps = 0
    for _ in range(iterations):
        approx, log = cd_sweeps(
            weight - outliers, sigma, grid, approx, sweeps=1, order=perm, block_size=block_size
        )
        sweeps += log.sweeps
        gradient = (approx + outliers - weight) @ sigma
        outliers = project_sparse(outliers - step * gradient, budget, structured)
        history.append(working_objective(weight, approx + outliers, sigma))
    if inner == "cdq":
        state = descend(
            weight - outliers,
            sigma,
            grid,
            approx,
            order=perm,
            sweep_budget=4 * final_sweeps,
            block_size=block_size,
        )
        approx, grid = state.approx, state.grid
        sweeps += state.sweeps
    else:
        approx, log = cd_sweeps(
            weight - outliers, sigma, grid, approx, sweeps=final_sweeps, order=perm, block_size=block_size
        )
        sweeps += log.sweeps
    codes = grid.quantize(approx)
    full = grid.dequantize(codes) + outliers
    check_finite(full, "quantease-outlier")
    value = working_objective(weight, full, sigma)
    history.append(value)
    return QuantResult(
        "quantease-outlier",
        full,
        codes,
        grid,
        value,
        start_value,
        sweeps=sweeps,
        seconds=time.perf_counter() - began,
        outliers=outliers,
        history=history,
    )
