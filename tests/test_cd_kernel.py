"""The shared CD kernel: fixed points are exact coordinate minima, monotone, blocking-invariant.

Every test runs once per CPU backend of the in-block kernel (the torch reference and numba)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from cdq_cli import kernels
from cdq_cli.solvers import Grid, GridSpec, fit_minmax, solve
from cdq_cli.solvers import cd as cd_module
from cdq_cli.solvers.cd import cd_sweeps, order_permutation

ORDERS = ("cyclic", "diag", "greedy")


@pytest.fixture(autouse=True, params=["torch", "numba"])
def kernel_backend(request, monkeypatch):
    """Run the test with this in-block kernel backend (``$CDQ_KERNEL``)."""
    if not kernels.available(request.param):
        pytest.skip(f"{request.param} is not installed")
    monkeypatch.setenv(kernels.ENV, request.param)
    return request.param


GRIDS = {"channel": {}, "group": {"group_size": 4}, "sym": {"sym": True}}


def _random_grid_point(grid: Grid, columns: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, grid.spec.maxq + 1, (grid.scale.shape[0], columns), generator=gen)
    return grid.dequantize(codes)


# --------------------------------------------------------------------------------------------
# (a) fixed points


@pytest.mark.parametrize("grid_kind", GRIDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_fixed_point_admits_no_improving_single_move(problem, single_move_gain, seed, bits, order, grid_kind):
    """At a converged sweep no single coordinate can move to any other level and lower f."""
    p = problem(seed, 6, 12)
    grid = p.grid(bits, **GRIDS[grid_kind])
    start = grid.round(p.weight)
    # The check has teeth: the RTN start is not a coordinate-wise minimum on these problems.
    assert single_move_gain(p.weight, p.sigma, grid, start) > 1e-6 * p.objective(start)
    perm = order_permutation(order, p.weight, p.sigma)
    approx, log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=200, order=perm, block_size=5)
    assert log.reached_fixed_point, log.changed
    gain = single_move_gain(p.weight, p.sigma, grid, approx)
    assert gain <= 1e-11 * (1 + p.objective(approx))
    assert p.objective(approx) <= p.objective(start)


def test_order_permutations():
    """cyclic is the identity, diag sorts diag Σ descending, greedy sorts |w_ij|·‖x_j‖ per row."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    x = torch.randn(9, 20, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2, 9).unsqueeze(1)
    sigma = x @ x.T
    assert order_permutation("cyclic", w, sigma) is None
    diag = order_permutation("diag", w, sigma)
    assert torch.all(sigma.diagonal()[diag].diff() <= 0)
    greedy = order_permutation("greedy", w, sigma)
    assert greedy.shape == w.shape
    score = w.abs() * x.norm(dim=1)
    for i in range(4):
        assert sorted(greedy[i].tolist()) == list(range(9))
        assert torch.all(score[i, greedy[i]].diff() <= 1e-12)
    with pytest.raises(ValueError, match="order"):
        order_permutation("random", w, sigma)


# --------------------------------------------------------------------------------------------
# (b) monotonicity


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", range(3))
def test_rounded_sweeps_never_increase_objective(problem, seed, order):
    """Each rounded sweep from a grid point is a sequence of exact coordinate minimisations."""
    p = problem(seed, 16, 24)
    grid = p.grid(3)
    start = _random_grid_point(grid, 24, seed)  # a poor start, so sweeps keep changing things
    perm = order_permutation(order, p.weight, p.sigma)
    _, log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=8, order=perm, stop_at_fixed_point=False)
    values = [p.objective(start)] + log.objectives
    for before, after in pairwise(values):
        assert after <= before * (1 + 1e-12)
    assert values[-1] < values[0]


@pytest.mark.parametrize("order", ORDERS)
def test_relaxed_sweeps_monotone_except_rounding_after_relaxing(problem, order):
    """A relaxed sweep never increases f; only a rounded sweep right after a relaxed one may."""
    p = problem(4, 12, 20)
    grid = p.grid(2)
    start = grid.round(p.weight)
    schedule = [False, True, False, True, True, False, False]
    perm = order_permutation(order, p.weight, p.sigma)
    _, log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=7, order=perm, relaxed=schedule)
    assert log.relaxed == schedule
    values = [p.objective(start)] + log.objectives
    for k, relax in enumerate(schedule):
        after_relaxed = k > 0 and schedule[k - 1]
        if relax or not after_relaxed:
            assert values[k + 1] <= values[k] * (1 + 1e-12)


@pytest.mark.parametrize("layout", [{}, {"group_size": 8}, {"per_layer": True}])
@pytest.mark.parametrize("seed", range(3))
def test_comq_history_monotone(problem, seed, layout):
    """COMQ alternates exact code sweeps and exact scale refits: its history never goes up."""
    p = problem(seed, 12, 32)
    per_layer = layout.get("per_layer", False)
    group = layout.get("group_size")
    result = solve("comq", p.weight, p.sigma, bits=3, group_size=group, per_layer=per_layer, iterations=6)
    assert len(result.history) == 6
    for before, after in pairwise(result.history):
        assert after <= before * (1 + 1e-12)
    assert result.objective == pytest.approx(result.history[-1], rel=1e-12)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_outlier_history_monotone(problem, seed, structured):
    """CD sweeps and 1/L projected-gradient (IHT) steps are both monotone, so is the history."""
    p = problem(seed, 12, 32)
    result = solve(
        "quantease-outlier",
        p.weight,
        p.sigma,
        bits=3,
        outlier_fraction=0.05,
        structured=structured,
        iterations=8,
    )
    values = [result.objective_start] + result.history
    for before, after in pairwise(values):
        assert after <= before * (1 + 1e-12)
    assert result.objective == pytest.approx(result.history[-1], rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_quantease_fast_history_monotone(problem, seed):
    p = problem(seed, 12, 32)
    result = solve("quantease", p.weight, p.sigma, bits=3, preset="fast", sweeps=6)
    values = [result.objective_start] + result.history
    for before, after in pairwise(values):
        assert after <= before * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# (c) blocking


@pytest.mark.parametrize("relaxed", [False, True])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", range(2))
def test_blocked_equals_unblocked(problem, seed, order, relaxed):
    """Lazy block updates are the sequential sweep reorganised: same Ŵ, same logged objectives."""
    p = problem(seed, 10, 37)  # 37 columns: every block size leaves a ragged last block
    grid = p.grid(3, group_size=None)
    start = grid.round(p.weight)
    perm = order_permutation(order, p.weight, p.sigma)
    schedule = [False, True, False, False] if relaxed else None
    runs = {
        b: cd_sweeps(p.weight, p.sigma, grid, start, sweeps=4, order=perm, relaxed=schedule, block_size=b)
        for b in (1, 4, 16, 128)
    }
    ref, ref_log = runs[1]
    for approx, log in runs.values():
        # Rounding differences in G could in principle flip an exact tie; on these seeds none does.
        assert torch.equal(grid.quantize(approx), grid.quantize(ref))
        torch.testing.assert_close(approx, ref, rtol=1e-10, atol=1e-12)
        assert log.changed == ref_log.changed
        assert log.objectives == pytest.approx(ref_log.objectives, rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_per_row_path_with_shared_permutation_equals_shared_path(problem, seed):
    """A (rows, columns) order whose rows are all one permutation must equal that shared order."""
    p = problem(seed, 9, 20)
    grid = p.grid(2)
    start = grid.round(p.weight)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(seed))
    shared, shared_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=5, order=perm, block_size=6)
    per_row, row_log = cd_sweeps(
        p.weight, p.sigma, grid, start, sweeps=5, order=perm.expand(9, 20).contiguous(), block_size=6
    )
    assert torch.equal(grid.quantize(per_row), grid.quantize(shared))
    assert row_log.changed == shared_log.changed
    assert row_log.objectives == pytest.approx(shared_log.objectives, rel=1e-10)


@pytest.mark.parametrize("row_block", [1, 3])
def test_per_row_row_blocking_is_invisible(problem, monkeypatch, row_block):
    """Rows processed in small row blocks (each stopping at its own fixed point) give the same
    Ŵ and the same summed log as all rows at once."""
    p = problem(5, 10, 16)
    grid = p.grid(3)
    start = _random_grid_point(grid, 16, 5)
    perm = order_permutation("greedy", p.weight, p.sigma)
    whole, whole_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=30, order=perm, block_size=8)
    monkeypatch.setattr(cd_module, "_GATHER_BUDGET", row_block * 8 * 16 * p.sigma.element_size())
    split, split_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=30, order=perm, block_size=8)
    assert torch.equal(split, whole)
    assert split_log.changed == whole_log.changed
    assert split_log.objectives == pytest.approx(whole_log.objectives, rel=1e-10)
    assert split_log.objectives[-1] == pytest.approx(p.objective(split), rel=1e-10)


# --------------------------------------------------------------------------------------------
# (d) float32 vs float64


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", range(2))
def test_float32_matches_float64(problem, seed, order):
    """Single precision follows the same trajectory up to rare tie flips.

    Measured on these seeds (32×64, 3 bits, 6 sweeps): 0 codes differ, objectives agree to ~3e-8
    relative. Bounds allow a few flips: ≤ 1% of codes, 1e-4 relative objective.
    """
    p = problem(seed, 32, 64, samples=512)
    grid = p.grid(3)
    perm = order_permutation(order, p.weight, p.sigma)
    hi, _ = cd_sweeps(p.weight, p.sigma, grid, grid.round(p.weight), sweeps=6, order=perm)
    w32, s32, g32 = p.weight.float(), p.sigma.float(), grid.to("cpu", torch.float32)
    lo, log32 = cd_sweeps(w32, s32, g32, g32.round(w32), sweeps=6, order=perm)
    assert lo.dtype == torch.float32
    mismatch = (grid.quantize(hi) != g32.quantize(lo)).float().mean().item()
    assert mismatch <= 0.01
    assert p.objective(lo.double()) == pytest.approx(p.objective(hi), rel=1e-4)
    assert log32.objectives[-1] == pytest.approx(p.objective(lo.double()), rel=1e-3)


# --------------------------------------------------------------------------------------------
# (e) dead columns


@pytest.mark.parametrize("relaxed", [False, True])
@pytest.mark.parametrize("order", ORDERS)
def test_dead_columns_get_grid_rounding_of_weight(problem, order, relaxed):
    """Σ_jj = 0: the column cannot affect f, so it is set to round(W) there, never NaN."""
    dead = (2, 7, 11)
    p = problem(6, 8, 14, dead=dead)
    grid = p.grid(3)
    perm = order_permutation(order, p.weight, p.sigma)
    schedule = [True, False] if relaxed else None
    for start in (p.weight.clone(), _random_grid_point(grid, 14, 1)):
        approx, log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=2, order=perm, relaxed=schedule)
        assert torch.all(torch.isfinite(approx))
        assert all(torch.isfinite(torch.tensor(log.objectives)))
        cols = list(dead)
        assert torch.equal(approx[:, cols], grid.round(p.weight)[:, cols])
        assert log.objectives[-1] == pytest.approx(p.objective(approx), rel=1e-10)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("rtn", {}),
        ("gptq", {"act_order": False}),
        ("gptq", {"act_order": True}),
        ("quantease", {}),
        ("quantease", {"preset": "fast"}),
        ("quantease-outlier", {}),
        ("comq", {}),
    ],
)
def test_solvers_survive_dead_columns(problem, method, options):
    """Every method gives a finite result whose objective matches a recomputation."""
    p = problem(7, 8, 16, dead=(0, 9))
    result = solve(method, p.weight, p.sigma, bits=3, **options)
    assert torch.all(torch.isfinite(result.weight))
    assert result.objective == pytest.approx(p.objective(result.weight), rel=1e-10)


# --------------------------------------------------------------------------------------------
# (f) the maintained G


@pytest.mark.parametrize("order", ORDERS)
def test_logged_objectives_match_recomputation(problem, order):
    """The log's objectives come from the incrementally updated G = EΣ; they must equal the
    objective recomputed from scratch after every sweep (chained one-sweep runs), and the
    changed counts must equal the entries that actually moved."""
    p = problem(8, 12, 30)
    grid = p.grid(3)
    perm = order_permutation(order, p.weight, p.sigma)
    schedule = [False, False, True, False, False, False]
    start = _random_grid_point(grid, 30, 8)
    full, full_log = cd_sweeps(
        p.weight, p.sigma, grid, start, sweeps=6, order=perm, relaxed=schedule, stop_at_fixed_point=False
    )
    current = start
    for k, relax in enumerate(schedule):
        nxt, log = cd_sweeps(p.weight, p.sigma, grid, current, sweeps=1, order=perm, relaxed=[relax])
        exact = p.objective(nxt)
        assert log.objectives[0] == pytest.approx(exact, rel=1e-10)
        assert full_log.objectives[k] == pytest.approx(exact, rel=1e-9)
        if not relax and not schedule[k - 1 if k else 0]:
            assert full_log.changed[k] == int((nxt != current).sum())
        current = nxt
    torch.testing.assert_close(full, current, rtol=1e-10, atol=1e-12)


def test_kernel_rejects_negative_sweeps(problem):
    p = problem(0, 3, 4)
    grid = fit_minmax(p.weight, GridSpec(bits=2))
    with pytest.raises(ValueError, match="sweeps"):
        cd_sweeps(p.weight, p.sigma, grid, p.weight, sweeps=-1)


# --------------------------------------------------------------------------------------------
# (f) the sweep tolerance


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_tolerance_stops_at_the_first_small_gain(problem, seed, order):
    """With a tolerance, the run stops right after the first sweep that gained less than it."""
    p = problem(seed, 16, 24)
    grid = p.grid(3)
    start = _random_grid_point(grid, 24, seed)
    perm = order_permutation(order, p.weight, p.sigma)
    _, full = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=30, order=perm, stop_at_fixed_point=False)
    values = [p.objective(start)] + full.objectives
    tolerance = 0.02
    gains = [(a - b) / a for a, b in pairwise(values)]
    first_small = next(k for k, gain in enumerate(gains) if gain < tolerance)
    stopped, log = cd_sweeps(
        p.weight, p.sigma, grid, start, sweeps=30, order=perm, stop_at_fixed_point=False, tolerance=tolerance
    )
    if order != "greedy":  # the per-row path applies the tolerance per block of rows: see below
        assert log.sweeps == first_small + 1
        assert log.stalled and not log.reached_fixed_point
        torch.testing.assert_close(log.objectives, full.objectives[: log.sweeps], rtol=1e-9, atol=0)
    assert p.objective(stopped) <= values[0]


def test_tolerance_zero_is_the_plain_run(problem):
    p = problem(4, 12, 20)
    grid = p.grid(2)
    start = _random_grid_point(grid, 20, 4)
    plain, plain_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=10)
    same, same_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=10, tolerance=0.0)
    assert torch.equal(plain, same) and plain_log == same_log
    with pytest.raises(ValueError, match="tolerance"):
        cd_sweeps(p.weight, p.sigma, grid, start, sweeps=1, tolerance=-1.0)


def test_per_row_tolerance_with_one_row_block_matches_shared(problem, monkeypatch):
    """One row block: the per-row path (same permutation on every row) stalls like the shared one."""
    p = problem(5, 8, 16)
    grid = p.grid(3)
    start = _random_grid_point(grid, 16, 5)
    perm = order_permutation("diag", p.weight, p.sigma)
    shared, shared_log = cd_sweeps(p.weight, p.sigma, grid, start, sweeps=20, order=perm, tolerance=0.01)
    per_row, row_log = cd_sweeps(
        p.weight, p.sigma, grid, start, sweeps=20, order=perm.expand(8, -1).contiguous(), tolerance=0.01
    )
    torch.testing.assert_close(per_row, shared, rtol=1e-12, atol=1e-12)
    assert row_log.sweeps == shared_log.sweeps and row_log.stalled == shared_log.stalled
