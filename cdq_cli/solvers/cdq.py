"""cdq's own method: coordinate descent from the best cheap start, alternated with grid refits.

Coordinate descent only moves downhill, so starting it from a good point (GPTQ, or the better of
several starts) gives a result no worse than that point. Each round runs rounded CD sweeps until a
sweep changes nothing (or the sweep budget runs out), then refits the grid in closed form for the
fixed codes (scales, and zero-points for asymmetric grids; see ``lsq``). The run ends at a fixed
point of both steps or at the budget. Every accepted step lowers the objective, and the best point
seen is returned, so the result never lies above the start.

Row by row. The objective is a sum over rows, ``Σ_i (w_i − ŵ_i) Σ (w_i − ŵ_i)ᵀ``, with no term
coupling two rows (on a per-row grid), so every choice is made by each row for itself: the start
(each row from its lowest start), when its sweeps stop, whether its refit is kept, which round it
keeps. Each is then no worse for that row than the layer-wide choice would be at that step, and a
band of rows solved alone makes the whole layer's choices for its rows (what lets a layer be solved
in bands, shared between ranks: :mod:`.bands`). A per-layer grid, one scale for the layer, decides
on the layer's sums.

Objectives: a row's sweeps' come from the sweep log (the start's plus the changes the kernel
made, row by row); the others are one working-dtype product each (:func:`row_objectives`); a
decision between two values closer than ``CLOSE`` is re-made in float64 (:func:`lower_rows`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import gguf
from .bands import shared
from .cd import cd_row_sweeps, order_permutation
from .grid import Grid, GridSpec
from .lsq import refit_scales, refit_scales_and_zeros
from .result import (
    QuantResult,
    check_finite,
    exact_row_objectives,
    lower_rows,
    row_objectives,
)
from .starts import START_POINTS, scored_start_rows

REFITS = ("none", "scales", "scales+zeros")
DEFAULT_STARTS = ("gptq", "gptq-actorder-clip")
# ``shrink`` when not given, on a GGUF block type's grid (uniform grids: 0). Chosen from
# scripts/bench_heldout.py's held-out layer errors, then measured in llama.cpp at Q4_K_M, Q3_K_M,
# Q4_0 and Q2_K (BENCHMARKS.md, "GGUF"); at W4 per channel it did not help (issue 19).
GGUF_SHRINK = 0.3


@dataclass
class Descent:
    """Where a descent ended and how it got there, row by row: ``values`` each row's objective
    (float64), ``row_sweeps`` the sweeps each row made, ``fixed`` whether its last step changed
    nothing; ``history`` the layer's objective after each step."""

    approx: torch.Tensor
    grid: Grid
    values: torch.Tensor
    row_sweeps: torch.Tensor
    fixed: torch.Tensor
    refits: int = 0
    history: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return float(self.values.sum())

    @property
    def sweeps(self) -> int:
        """The most sweeps any row made."""
        return int(self.row_sweeps.max()) if self.row_sweeps.numel() else 0

    @property
    def fixed_point(self) -> bool:
        """Every row at a fixed point of both steps (a sweep that changed nothing, no better grid)."""
        return bool(self.fixed.all())


def descend(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    approx: torch.Tensor,
    *,
    order: torch.Tensor | None,
    sweep_budget: int,
    refit: str = "scales+zeros",
    block_size: int = 128,
    tolerance: float = 0.0,
    values: torch.Tensor | None = None,
) -> Descent:
    """Alternate CD sweeps with grid refits, every row on its own; never return a worse row.

    Each row sweeps to a fixed point, or until a sweep gains less than ``tolerance`` (a fraction of
    the row's objective) or the row has spent ``sweep_budget`` sweeps; then its grid row is
    refitted for its codes, and kept only if it lowers the row's objective. A row ends at a refit
    that gains nothing, or at the refit after its last budgeted sweep. Rows never interact in
    ``tr(E Σ Eᵀ)`` and every choice here is a row's own, so a band of rows descends exactly as
    those rows do in the whole layer (a per-layer grid, one scale for every row, decides on the
    layer's sums instead). ``values``: each row's objective at ``approx`` when the caller has them.
    """
    if refit not in REFITS:
        raise ValueError(f"unknown refit {refit!r}: choose one of {', '.join(REFITS)}")
    rows = weight.shape[0]
    together = grid.spec.per_layer
    values = row_objectives(weight, approx, sigma) if values is None else values
    state = Descent(
        approx.clone(),
        grid,
        values.to("cpu", torch.float64, copy=True),
        torch.zeros(rows, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.bool),
    )
    going = torch.ones(rows, dtype=torch.bool)  # rows that have not ended
    wsigma = None
    while True:
        budgets = torch.where(going, sweep_budget - state.row_sweeps, 0).clamp_min(0)
        swept = budgets > 0
        if not bool(swept.any()):
            break
        run = cd_row_sweeps(
            weight, sigma, state.grid, state.approx, state.values, budgets=budgets, order=order,
            block_size=block_size, tolerance=tolerance, together=together,
        )  # fmt: skip
        state.row_sweeps += run.sweeps
        state.fixed = torch.where(swept, run.fixed, state.fixed)
        index = swept.nonzero().squeeze(1)
        on = index.to(weight.device)
        moved = index[(run.approx[on] != state.approx[on]).any(dim=1).cpu()]
        if moved.numel():
            swept_rows = run.approx[moved.to(weight.device)]
            _keep_lower(state, weight, sigma, moved, swept_rows, run.values[moved], None, or_equal=True)
        state.history.append(state.value)
        if refit == "none":
            break
        # refit the grid rows of the rows just swept, for their codes
        if state.grid.spec.block_type is not None:  # a GGUF type: its own refit, stored widths kept
            fitter = gguf.refit
        else:
            fitter = refit_scales_and_zeros if refit == "scales+zeros" else refit_scales
        wsigma = weight @ sigma if wsigma is None else wsigma  # the same for every refit
        rows_grid = state.grid.take(on)
        codes = rows_grid.quantize(state.approx[on])
        fitted = fitter(weight[on], sigma, rows_grid, codes, wsigma=wsigma[on])
        candidate = fitted.dequantize(codes)
        values = row_objectives(weight[on], candidate, sigma).cpu()
        accepted = torch.zeros(rows, dtype=torch.bool)
        accepted[index] = _keep_lower(state, weight, sigma, index, candidate, values, fitted, margin=1e-9)
        going &= accepted  # a row whose grid is already optimal for its codes has ended
        state.fixed &= ~accepted
        state.refits += int(bool(accepted.any()))
        state.history.append(state.value)
    return state


def _keep_lower(
    state: Descent,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    index: torch.Tensor,
    candidate: torch.Tensor,
    values: torch.Tensor,
    grid: Grid | None,
    *,
    margin: float = 0.0,
    or_equal: bool = False,
) -> torch.Tensor:
    """For the rows ``index`` of the layer, take ``candidate``'s rows (and ``grid``'s, the grid of
    those rows) where their objectives ``values`` are lower than the state's (:func:`lower_rows`,
    close calls in float64); returns which of them were taken."""
    on = index.to(weight.device)
    current = state.approx[on]

    def exact(close: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = close.to(weight.device)
        count = int(close.sum())
        rows = weight[on][picked]
        pairs = torch.cat([candidate[picked], current[picked]])
        both = exact_row_objectives(torch.cat([rows, rows]), pairs, sigma)
        return both[:count].cpu(), both[count:].cpu()

    together = state.grid.spec.per_layer
    better, new, old = lower_rows(
        values, state.values[index], exact, margin=margin, or_equal=or_equal, together=together
    )
    state.values[index] = torch.where(better, new, old)
    if bool(better.any()):
        taken, picked = index[better], better.to(weight.device)
        state.approx[taken.to(weight.device)] = candidate[picked]
        if grid is not None:
            state.grid = state.grid.replaced(taken.to(weight.device), grid.take(picked))
    return better


def best_start(
    kinds: tuple[str, ...] | list[str],
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: Grid | None = None,
    *,
    damping: float = 0.01,
) -> tuple[torch.Tensor, Grid, torch.Tensor, list[str]]:
    """Each row from the start of ``kinds`` whose objective on that row is lowest (each start on
    the grid it chooses, or ``grid``; a per-layer grid: the start lowest on the layer). Returns the
    start, its grid, each row's objective and the kind each row came from."""
    if not kinds:
        raise ValueError(f"at least one start is needed: choose from {', '.join(START_POINTS)}")
    best = None
    for kind in kinds:
        if kind == "weight":
            raise ValueError("the cdq method starts from a point on the grid: use rtn or a gptq start")
        approx, start_grid, values = scored_start_rows(kind, weight, sigma, spec, grid, damping=damping)
        values = values.cpu()
        if best is None:
            none = torch.zeros_like(values, dtype=torch.bool)
            best = Descent(approx.clone(), start_grid, values.clone(), none.long(), none)
            picks = [kind] * weight.shape[0]
            continue
        everywhere = torch.arange(weight.shape[0])
        taken = _keep_lower(best, weight, sigma, everywhere, approx, values, start_grid)
        picks = [kind if t else p for t, p in zip(taken.tolist(), picks, strict=True)]
    return best.approx, best.grid, best.values, picks


def solve_cdq(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    starts: tuple[str, ...] | list[str] | str = DEFAULT_STARTS,
    order: str = "diag",
    sweeps: int = 4,
    refit: str = "scales+zeros",
    block_size: int = 128,
    damping: float = 0.01,
    tolerance: float = 0.0,
    rounds: int = 1,
    shrink: float | None = None,
    grid: Grid | None = None,
) -> QuantResult:
    """cdq: best of ``starts``, then ``descend`` with at most ``sweeps`` sweeps in ``order``.

    ``shrink`` = α > 0 solves on ``Σ + α·Diag(Σ)`` (Σ shrunk toward its diagonal) and reports the
    objective on Σ itself. Σ is estimated from a few thousand tokens, and its smallest directions
    are estimated worst: on SmolLM2's ``down_proj`` (1,536 columns, 16k calibration tokens) the full
    solution's error on held-out WikiText-2 inputs was 1.04× round-to-nearest's while it was 0.72×
    on the calibration; α = 0.3 gave 0.95× held out for 0.72× on the calibration. Only the diagonal
    changes, in place, and is put back bit for bit. Not given (None): :data:`GGUF_SHRINK` on a
    GGUF block type's grid, whose small blocks of 16–32 weights follow Σ most closely, else 0.

    ``grid``: a fixed start grid for every start (a GGUF block type's; its refits keep the type's
    stored widths, and either refit option turns them on).

    The default starts are plain GPTQ (so the result is never above GPTQ's) and GPTQ in act-order
    on a range-clipped grid, which on real SmolLM2 layers was below plain, act-order and clipped
    GPTQ everywhere we measured. ``diag`` order matches ``greedy`` in quality and keeps the fast
    shared-order kernel. ``tolerance`` > 0 ends a row's run of sweeps once a sweep gained less than
    that fraction of the row's objective; by default (0) a row sweeps to a fixed point or the
    budget: a row stopped early by a tolerance gets a refit and a further round of its own, which
    on 16 real SmolLM2 layers 1e-3 cost 17% more time (4.40 s against 3.76 s) for an objective
    0.01% lower (0.23757 against 0.23760 of RTN's, mean ratio; BENCHMARKS.md, "Layers in bands of
    rows"). Four sweeps
    plus refits keep the solver a few GPTQ solves long; more sweeps gain ~1% of the objective per
    doubling on SmolLM2 layers.

    ``rounds`` > 1 re-runs act-order GPTQ on the refitted grid of the best point so far and descends
    again from there (the codes GPTQ picks for the better grid beat what CD alone reaches from the
    old codes); each round costs about one more GPTQ solve plus its sweeps.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if shrink is None:
        shrink = GGUF_SHRINK if spec.block_type is not None else 0.0
    if not shrink >= 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    with shared(sigma), _shrunk(sigma, shrink):  # Σ-only work once, however many bands
        result, start = _solve_cdq(weight, sigma, spec, starts, order, sweeps, refit, block_size, damping,
                                   tolerance, rounds, grid)  # fmt: skip
    if shrink:  # the report's objectives are on Σ (the history stays the solver's own, on the shrunk Σ)
        result.row_objective = row_objectives(weight, result.weight, sigma).cpu()
        result.objective = float(result.row_objective.sum())
        result.objective_start = float(row_objectives(weight, start, sigma).sum())
    return result


@contextmanager
def _shrunk(sigma: torch.Tensor, shrink: float) -> Iterator[None]:
    """Σ's diagonal scaled by ``1 + shrink`` (Σ + shrink·Diag(Σ)) inside, put back bit for bit after."""
    if not shrink:
        yield
        return
    diagonal = sigma.diagonal().clone()
    sigma.diagonal().mul_(1.0 + shrink)
    try:
        yield
    finally:
        sigma.diagonal().copy_(diagonal)


def _solve_cdq(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    starts: tuple[str, ...] | list[str] | str,
    order: str,
    sweeps: int,
    refit: str,
    block_size: int,
    damping: float,
    tolerance: float,
    rounds: int,
    grid: Grid | None,
) -> tuple[QuantResult, torch.Tensor]:
    """:func:`solve_cdq` on ``sigma`` as given; also the start point it descended from."""
    began = time.perf_counter()
    if isinstance(starts, str):
        starts = tuple(s for s in starts.split(",") if s)
    approx, grid, start_values, _ = best_start(starts, weight, sigma, spec, grid, damping=damping)
    perm = order_permutation(order, weight, sigma)

    def run(approx: torch.Tensor, grid: Grid, values: torch.Tensor) -> Descent:
        return descend(
            weight,
            sigma,
            grid,
            approx,
            order=perm,
            sweep_budget=sweeps,
            refit=refit,
            block_size=block_size,
            tolerance=tolerance,
            values=values,
        )

    state = run(approx, grid, start_values)
    for _ in range(rounds - 1):
        # act-order GPTQ on each row's (refitted) grid of the best point so far, descended again;
        # each row keeps the lower of the two
        restart = scored_start_rows("gptq-actorder", weight, sigma, spec, state.grid, damping=damping)
        again = run(*restart)
        state.row_sweeps += again.row_sweeps
        lower = again.values < state.values
        if grid.spec.per_layer:
            lower[:] = again.value < state.value
        on = lower.to(weight.device)
        state.approx = torch.where(on.unsqueeze(1), again.approx, state.approx)
        state.grid = state.grid.where(on, again.grid)
        state.values = torch.where(lower, again.values, state.values)
        state.fixed = torch.where(lower, again.fixed, state.fixed)
        state.refits += again.refits
        state.history.append(state.value)
    codes = state.grid.quantize(state.approx)
    final = state.grid.dequantize(codes)
    check_finite(final, "cdq")
    # The best point is on its grid, so the round trip gives it back bit for bit and its objective
    # is already known (from a sweep's log or a refit's product); recompute only if it did not.
    values = state.values
    if not torch.equal(final, state.approx):
        values = row_objectives(weight, final, sigma).cpu()
    result = QuantResult(
        "cdq",
        final,
        codes,
        state.grid,
        float(values.sum()),
        float(start_values.sum()),
        sweeps=state.sweeps,
        seconds=time.perf_counter() - began,
        history=state.history,
        row_objective=values,
    )
    return result, approx
