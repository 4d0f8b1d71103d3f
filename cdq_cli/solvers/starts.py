"""Start points for coordinate descent: the weights themselves, RTN, or GPTQ."""

from __future__ import annotations

import torch

from .gptq import solve_gptq
from .grid import Grid, GridSpec, fit_clipped, fit_minmax
from .result import working_objective

START_POINTS = ("weight", "rtn", "gptq", "gptq-actorder", "gptq-clip", "gptq-actorder-clip")


def start_point(
    kind: str,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: Grid | None = None,
    *,
    damping: float = 0.01,
) -> tuple[torch.Tensor, Grid]:
    """Ŵ to start CD from, and the grid it lies on.

    ``grid`` None lets the start choose: min–max for ``weight``/``rtn``, GPTQ's own (its dynamic
    group grids) for ``gptq``; ``gptq-actorder`` visits columns by decreasing diag Σ;
    ``gptq-clip`` runs GPTQ on a range-clipped grid (``fit_clipped``); ``gptq-actorder-clip`` both
    (in our exploration on SmolLM2 block 3 it was the lowest of these starts on every layer,
    at 3 and 4 bits, per-channel and g64). ``weight`` starts from W itself, off the grid: the first rounded
    sweep puts it on.
    """
    approx, grid, _ = scored_start_point(kind, weight, sigma, spec, grid, damping=damping)
    return approx, grid


def scored_start_point(
    kind: str,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: Grid | None = None,
    *,
    damping: float = 0.01,
) -> tuple[torch.Tensor, Grid, float]:
    """``start_point`` plus the start's objective (GPTQ already computed it: no second product)."""
    if kind not in START_POINTS:
        raise ValueError(f"unknown start point {kind!r}: choose one of {', '.join(START_POINTS)}")
    if kind.startswith("gptq"):
        if kind.endswith("clip"):
            grid = grid if grid is not None else fit_clipped(weight, spec, sigma.diagonal())
        act_order = "actorder" in kind
        # GPTQ's grid is ``grid`` itself when one is given (its fixed_grid)
        result = solve_gptq(weight, sigma, spec, damping=damping, act_order=act_order, fixed_grid=grid)
        return result.weight, result.grid, result.objective
    grid = grid if grid is not None else fit_minmax(weight, spec)
    approx = weight.clone() if kind == "weight" else grid.round(weight)
    return approx, grid, working_objective(weight, approx, sigma)
