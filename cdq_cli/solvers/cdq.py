"""cdq's own method: coordinate descent from the best cheap start, alternated with grid refits.

Coordinate descent only moves downhill, so starting it from a good point (GPTQ, or the better of
several starts) gives a result no worse than that point. Each round runs rounded CD sweeps until a
sweep changes nothing (or the sweep budget runs out), then refits the grid in closed form for the
fixed codes (scales, and zero-points for asymmetric grids; see ``lsq``). The run ends at a fixed
point of both steps or at the budget. Every accepted step lowers the objective, and the best point
seen is returned, so the result never lies above the start.

Objectives: a sweep's comes from its log (the start's plus the changes the kernel summed); the
others are one working-dtype product each (:func:`working_objective`); a decision between two
values closer than ``CLOSE`` is re-made in float64 (:func:`lower`).
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import gguf
from .bands import finish, shared
from .cd import cd_sweeps, order_permutation
from .grid import Grid, GridSpec
from .lsq import refit_scales, refit_scales_and_zeros
from .result import QuantResult, check_finite, lower, objective, working_objective
from .starts import START_POINTS, scored_start_point

REFITS = ("none", "scales", "scales+zeros")
DEFAULT_STARTS = ("gptq", "gptq-actorder-clip")
# ``shrink`` when not given, on a GGUF block type's grid (uniform grids: 0). Chosen from
# scripts/bench_heldout.py's held-out layer errors, then measured in llama.cpp at Q4_K_M, Q3_K_M,
# Q4_0 and Q2_K (BENCHMARKS.md, "GGUF"); at W4 per channel it did not help (issue 19).
GGUF_SHRINK = 0.3


@dataclass
class Descent:
    """Where a descent ended and how it got there."""

    approx: torch.Tensor
    grid: Grid
    value: float
    sweeps: int = 0
    refits: int = 0
    fixed_point: bool = False
    history: list[float] = field(default_factory=list)


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
    value: float | None = None,
) -> Descent:
    """Alternate CD sweeps with grid refits; never return a worse point.

    Sweeps run to a fixed point, or until a sweep gains less than ``tolerance`` (a fraction of the
    objective) or the sweep budget is spent, then the grid is refitted; the loop ends when a refit
    gains nothing or after the refit that follows the last budgeted sweep. ``value``: the objective
    of ``approx`` when the caller already has it.
    """
    if refit not in REFITS:
        raise ValueError(f"unknown refit {refit!r}: choose one of {', '.join(REFITS)}")
    state = Descent(approx, grid, working_objective(weight, approx, sigma) if value is None else value)
    wsigma = None
    while state.sweeps < sweep_budget:
        swept, log = cd_sweeps(
            weight,
            sigma,
            state.grid,
            state.approx,
            sweeps=sweep_budget - state.sweeps,
            order=order,
            block_size=block_size,
            tolerance=tolerance,
            start_objective=state.value,
        )
        state.sweeps += log.sweeps
        if any(log.changed):
            better, value, state.value = lower(
                log.objectives[-1],
                state.value,
                lambda swept=swept: (objective(weight, swept, sigma), objective(weight, state.approx, sigma)),
                or_equal=True,
            )
            if better:
                state.approx, state.value = swept, value
        state.history.append(state.value)
        state.fixed_point = log.reached_fixed_point
        if refit == "none":
            break
        codes = state.grid.quantize(state.approx)
        if state.grid.spec.block_type is not None:  # a GGUF type: its own refit, stored widths kept
            fitter = gguf.refit
        else:
            fitter = refit_scales_and_zeros if refit == "scales+zeros" else refit_scales
        wsigma = weight @ sigma if wsigma is None else wsigma  # the same for every refit
        new_grid = fitter(weight, sigma, state.grid, codes, wsigma=wsigma)
        candidate = new_grid.dequantize(codes)
        better, value, state.value = lower(
            working_objective(weight, candidate, sigma),
            state.value,
            lambda candidate=candidate: (
                objective(weight, candidate, sigma),
                objective(weight, state.approx, sigma),
            ),
            margin=1e-9,
        )
        if not better:
            break  # the grid is already optimal for these codes: a fixed point of both steps
        state.approx, state.grid, state.value = candidate, new_grid, value
        state.refits += 1
        state.fixed_point = False
        state.history.append(value)
    return state


def best_start(
    kinds: tuple[str, ...] | list[str],
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: Grid | None = None,
    *,
    damping: float = 0.01,
) -> tuple[torch.Tensor, Grid, float, str]:
    """The lowest-objective start among ``kinds`` (each on the grid it chooses, or ``grid``)."""
    _check_starts(kinds)
    best = None
    for kind in kinds:
        best = _better_start(best, kind, weight, sigma, spec, grid, damping)
    return best


def _check_starts(kinds: tuple[str, ...] | list[str]) -> None:
    if not kinds:
        raise ValueError(f"at least one start is needed: choose from {', '.join(START_POINTS)}")
    if "weight" in kinds:
        raise ValueError("the cdq method starts from a point on the grid: use rtn or a gptq start")


def _better_start(
    best: tuple[torch.Tensor, Grid, float, str] | None,
    kind: str,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    grid: Grid | None,
    damping: float,
) -> tuple[torch.Tensor, Grid, float, str]:
    """``best`` so far or the start ``kind``, whichever is lower (``best`` on a tie)."""
    approx, start_grid, value = scored_start_point(kind, weight, sigma, spec, grid, damping=damping)
    if best is None:
        return approx, start_grid, value, kind
    better, value, best_value = lower(
        value,
        best[2],
        lambda a=approx, b=best[0]: (objective(weight, a, sigma), objective(weight, b, sigma)),
    )
    return (approx, start_grid, value, kind) if better else (*best[:2], best_value, best[3])


def solve_cdq(weight: torch.Tensor, sigma: torch.Tensor, spec: GridSpec, **options: Any) -> QuantResult:
    """cdq on one layer: :func:`cdq_phases` (its options, documented there) run to its end, its
    Σ-only work kept for this call (a caller's :func:`.bands.shared` block on the same Σ, if any)."""
    with shared(sigma):
        return finish(cdq_phases(weight, sigma, spec, **options))


def cdq_phases(
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
    tolerance: float = 1e-3,
    rounds: int = 1,
    shrink: float | None = None,
    grid: Grid | None = None,
) -> Generator[None, None, QuantResult]:
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
    shared-order kernel. ``tolerance`` ends a run of sweeps whose gain per sweep fell below that
    fraction (0: only at a fixed point or the budget). Four sweeps plus refits keep the solver a
    few GPTQ solves long; more sweeps gain ~1% of the objective per doubling on SmolLM2 layers.

    ``rounds`` > 1 re-runs act-order GPTQ on the refitted grid of the best point so far and descends
    again from there (the codes GPTQ picks for the better grid beat what CD alone reaches from the
    old codes); each round costs about one more GPTQ solve plus its sweeps.

    In phases: a generator that pauses after each start, where the Σ-only work that start made
    (its GPTQ factor) is no longer needed, and returns the result; the same result, bit for bit,
    however its pauses are used. A layer's bands run through it in lockstep
    (:func:`.bands.lockstep`), so no factor outlives its start and none lives through the sweeps:
    on a 2048 × 8192 ``down_proj`` (Σ 256 MiB) that is two factors' blocks (256 MiB) fewer during
    the sweeps and one fewer at the second factorization. ``shrink`` is applied to Σ inside each
    phase and undone at each pause. The caller holds the :func:`.bands.shared` block the Σ-only
    work is kept in (without one it is made again where it is needed).
    """
    began = time.perf_counter()  # this band's own time: the pauses (other bands' phases) excluded
    spent = 0.0
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if shrink is None:
        shrink = GGUF_SHRINK if spec.block_type is not None else 0.0
    if not shrink >= 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    if isinstance(starts, str):
        starts = tuple(s for s in starts.split(",") if s)
    _check_starts(starts)
    best = None
    for kind in starts:
        with _shrunk(sigma, shrink):
            best = _better_start(best, kind, weight, sigma, spec, grid, damping)
        spent += time.perf_counter() - began
        yield
        began = time.perf_counter()
    approx, start_grid, start_value, _ = best
    with _shrunk(sigma, shrink):
        result = _descend_from(
            weight, sigma, spec, approx, start_grid, start_value, order, sweeps, refit, block_size,
            damping, tolerance, rounds,
        )  # fmt: skip
    result.seconds = spent + time.perf_counter() - began
    if shrink:  # the report's objectives are on Σ (the history stays the solver's own, on the shrunk Σ)
        result.objective = working_objective(weight, result.weight, sigma)
        result.objective_start = working_objective(weight, approx, sigma)
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


def _descend_from(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    approx: torch.Tensor,
    grid: Grid,
    start_value: float,
    order: str,
    sweeps: int,
    refit: str,
    block_size: int,
    damping: float,
    tolerance: float,
    rounds: int,
) -> QuantResult:
    """cdq from its best start (``approx`` on ``grid``, objective ``start_value``), on ``sigma``
    as given: the descent, and ``rounds`` − 1 act-order GPTQ restarts on the refitted grid."""
    perm = order_permutation(order, weight, sigma)

    def run(approx: torch.Tensor, grid: Grid, value: float) -> Descent:
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
            value=value,
        )

    state = run(approx, grid, start_value)
    for _ in range(rounds - 1):
        # act-order GPTQ on the best point's (refitted) grid
        restart = scored_start_point("gptq-actorder", weight, sigma, spec, state.grid, damping=damping)
        again = run(*restart)
        state.sweeps += again.sweeps
        if again.value < state.value:
            state.approx, state.grid, state.value = again.approx, again.grid, again.value
            state.fixed_point, state.refits = again.fixed_point, state.refits + again.refits
        state.history.append(state.value)
    codes = state.grid.quantize(state.approx)
    final = state.grid.dequantize(codes)
    check_finite(final, "cdq")
    # The best point is on its grid, so the round trip gives it back bit for bit and its objective
    # is already known (from a sweep's log or a refit's product); recompute only if it did not.
    same = torch.equal(final, state.approx)
    value = state.value if same else working_objective(weight, final, sigma)
    return QuantResult(
        "cdq",
        final,
        codes,
        state.grid,
        value,
        start_value,
        sweeps=state.sweeps,
        history=state.history,
    )
