"""Solver-level properties: exact optima on tiny problems, the scale refit, outliers, consistency."""

from __future__ import annotations

import itertools

import pytest
import torch

from cdq_cli.solvers import METHODS as DECLARED
from cdq_cli.solvers import Grid, GridSpec, fit_minmax, method_options, solve
from cdq_cli.solvers.lsq import refit_scales
from cdq_cli.solvers.outliers import project_sparse
from cdq_cli.solvers.result import objective

LAYOUTS = {
    "channel": {},
    "group": {"group_size": 8},
    "layer": {"per_layer": True},
    "sym": {"sym": True},
}
METHODS = [
    ("rtn", {}),
    ("gptq", {}),
    ("gptq", {"act_order": True}),
    ("quantease", {}),
    ("quantease", {"preset": "fast"}),
    ("quantease-outlier", {"outlier_fraction": 0.03}),
    ("quantease-outlier", {"outlier_fraction": 0.1, "structured": True}),
    ("comq", {}),
]


def _method_id(case) -> str:
    method, options = case
    return method + "".join(f"-{k}={v}" for k, v in options.items())


# --------------------------------------------------------------------------------------------
# Brute force on tiny problems

_BRUTE_SEEDS = range(50)
_CD_METHODS = {
    # name: (method, options, floor on the rate of finding the exact optimum)
    # Measured on seeds 0..49 (1×8, 2 bits, correlated inputs): fast 62%, paper 80%, comq 68%;
    # worst ratio to the optimum 1.96 (comq), 1.86 (fast), 1.71 (paper). RTN alone: 26%, up to 4.07×.
    "quantease-fast": ("quantease", {"preset": "fast"}, 0.50),
    "quantease-paper": ("quantease", {"preset": "paper"}, 0.65),
    "comq": ("comq", {"update_scales": False}, 0.55),
}
_WORST_RATIO = 2.5


@pytest.fixture(scope="module")
def all_codes_2bit_8() -> torch.Tensor:
    """Every one of the 4**8 = 65,536 code vectors of a 1×8 2-bit row."""
    return torch.tensor(list(itertools.product(range(4), repeat=8)), dtype=torch.float64)


@pytest.mark.parametrize("name", _CD_METHODS)
def test_cd_against_exact_optimum(problem, all_codes_2bit_8, name):
    """CD is never below the exact grid optimum (sanity), within a bounded factor of it, and finds
    it on most seeds (measured rates in ``_CD_METHODS``)."""
    method, options, floor = _CD_METHODS[name]
    hits, worst = 0, 1.0
    for seed in _BRUTE_SEEDS:
        p = problem(seed, 1, 8)
        grid = p.grid(2)
        candidates = grid.scale * (all_codes_2bit_8 - grid.zero)  # every point of the fixed grid
        err = p.weight - candidates
        optimum = float(((err @ p.sigma) * err).sum(dim=1).min())
        result = solve(method, p.weight, p.sigma, bits=2, **options)
        # The solver must have used that same fixed min–max grid.
        assert torch.equal(result.grid.scale, grid.scale) and torch.equal(result.grid.zero, grid.zero)
        assert result.objective >= optimum * (1 - 1e-12)
        ratio = result.objective / optimum
        worst = max(worst, ratio)
        hits += ratio <= 1 + 1e-9
    rate = hits / len(_BRUTE_SEEDS)
    print(f"{name}: exact optimum on {rate:.0%} of {len(_BRUTE_SEEDS)} seeds, worst ratio {worst:.3f}")
    assert rate >= floor
    assert worst <= _WORST_RATIO


# --------------------------------------------------------------------------------------------
# COMQ's scale refit against an independent least-squares solve


def _refit_case(problem, seed, spec: GridSpec):
    """A problem, a grid whose scales are deliberately off, and the codes of W on it."""
    p = problem(seed, 7, 16, samples=40)
    base = fit_minmax(p.weight, spec)
    gen = torch.Generator().manual_seed(seed)
    off = base.scale * (0.7 + 0.2 * torch.rand(base.scale.shape, generator=gen, dtype=torch.float64))
    if spec.per_layer:
        off = off[:1, :1].expand_as(base.scale).clone()
    grid = Grid(spec, off, base.zero.clone())
    return p, grid, grid.quantize(p.weight)


def _lstsq_scales(p, grid: Grid, codes: torch.Tensor) -> torch.Tensor:
    """min over scales of ‖(W − Ŵ(s)) X‖², solved with lstsq on the explicit stacked problem."""
    rows, columns = p.weight.shape
    _, zero = grid.expand(columns)
    levels = codes.double() - zero
    target = p.weight @ p.inputs  # (rows, n)
    if grid.spec.per_layer:
        design = (levels @ p.inputs).reshape(-1, 1)
        solution = torch.linalg.lstsq(design, target.reshape(-1, 1), driver="gelsd").solution
        return solution.reshape(1, 1).expand(rows, 1)
    n_groups = grid.scale.shape[1]
    size = columns // n_groups
    # design[i, :, g] = (levels_i restricted to group g) X
    design = torch.einsum(
        "igs,gsn->ing", levels.reshape(rows, n_groups, size), p.inputs.reshape(n_groups, size, -1)
    )
    return torch.linalg.lstsq(design, target.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


@pytest.mark.parametrize("layout", ["channel", "group", "layer", "sym", "sym-group"])
@pytest.mark.parametrize("seed", range(3))
def test_refit_scales_is_least_squares(problem, seed, layout):
    spec = {
        "channel": GridSpec(bits=3),
        "group": GridSpec(bits=3, group_size=4),
        "layer": GridSpec(bits=3, per_layer=True),
        "sym": GridSpec(bits=3, sym=True),
        "sym-group": GridSpec(bits=4, sym=True, group_size=8),
    }[layout]
    p, grid, codes = _refit_case(problem, seed, spec)
    refit = refit_scales(p.weight, p.sigma, grid, codes)
    expected = _lstsq_scales(p, grid, codes)
    assert refit.scale.shape == grid.scale.shape
    torch.testing.assert_close(refit.scale, expected, rtol=1e-9, atol=0)
    assert torch.equal(refit.zero, grid.zero)
    before = objective(p.weight, grid.dequantize(codes), p.sigma)
    after = objective(p.weight, refit.dequantize(codes), p.sigma)
    assert after <= before


def test_refit_keeps_scale_of_degenerate_row_and_group(problem):
    """Codes all at the zero-point leave no information: those scales stay, the rest are solved."""
    p, grid, codes = _refit_case(problem, 3, GridSpec(bits=3, group_size=4))
    _, zero = grid.expand(16)
    codes = codes.clone()
    codes[2] = zero[2].to(torch.uint8)  # whole row at zero
    codes[4, 4:8] = zero[4, 4:8].to(torch.uint8)  # one group of row 4
    refit = refit_scales(p.weight, p.sigma, grid, codes)
    assert torch.equal(refit.scale[2], grid.scale[2])
    assert refit.scale[4, 1] == grid.scale[4, 1]
    expected = _lstsq_scales(p, grid, codes)
    others = [0, 2, 3]
    torch.testing.assert_close(refit.scale[4, others], expected[4, others], rtol=1e-9, atol=0)
    torch.testing.assert_close(refit.scale[[0, 1, 3, 5, 6]], expected[[0, 1, 3, 5, 6]], rtol=1e-9, atol=0)


def test_comq_per_layer_has_one_scale(problem):
    p = problem(1, 10, 24)
    result = solve("comq", p.weight, p.sigma, bits=3, per_layer=True)
    assert torch.all(result.scale == result.scale[0, 0])
    assert result.objective < solve("rtn", p.weight, p.sigma, bits=3, per_layer=True).objective


@pytest.mark.parametrize("scalar", [1.0, 0.8])
def test_comq_without_scale_updates_keeps_scaled_minmax_grid(problem, scalar):
    p = problem(2, 6, 16)
    result = solve("comq", p.weight, p.sigma, bits=3, update_scales=False, scalar=scalar)
    base = fit_minmax(p.weight, GridSpec(bits=3))
    torch.testing.assert_close(result.scale, base.scale * scalar, rtol=0, atol=0)
    assert torch.equal(result.zero, base.zero)


# --------------------------------------------------------------------------------------------
# Outlier-aware QuantEase


@pytest.mark.parametrize("fraction", [0.025, 0.1, 0.2])
@pytest.mark.parametrize("structured", [False, True])
def test_outliers_respect_budget_and_compose(problem, structured, fraction):
    """H has at most its budget of nonzeros (or of nonzero columns), and W_out = deq(codes) + H."""
    p = problem(3, 12, 40)
    result = solve(
        "quantease-outlier", p.weight, p.sigma, bits=3, outlier_fraction=fraction, structured=structured
    )
    h = result.outliers
    assert h is not None and h.shape == p.weight.shape
    if structured:
        budget = round(fraction * 40)
        assert int((h != 0).any(dim=0).sum()) <= budget
    else:
        budget = round(fraction * 12 * 40)
        assert result.outlier_count <= budget
    assert result.outlier_count > 0
    assert torch.equal(result.weight, result.grid.dequantize(result.codes) + h)
    assert result.objective == pytest.approx(p.objective(result.weight), rel=1e-12)


def test_outliers_beat_plain_quantease_and_zero_budget_is_plain_cd(problem):
    """With no budget the method is exactly CD from RTN; with a budget it can only help here."""
    p = problem(4, 12, 32)
    none = solve(
        "quantease-outlier", p.weight, p.sigma, bits=3, outlier_fraction=0.0, iterations=3, final_sweeps=2
    )
    assert none.outlier_count == 0
    plain = solve("quantease", p.weight, p.sigma, bits=3, preset="fast", start="rtn", sweeps=5, order="diag")
    assert torch.equal(none.codes, plain.codes)
    some = solve("quantease-outlier", p.weight, p.sigma, bits=3, outlier_fraction=0.05)
    assert some.objective < none.objective


def test_project_sparse_keeps_largest():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    kept = project_sparse(m, 7, structured=False)
    assert int((kept != 0).sum()) == 7
    threshold = m.abs().flatten().sort(descending=True).values[6]
    assert torch.equal(kept, torch.where(m.abs() >= threshold, m, torch.zeros_like(m)))
    cols = project_sparse(m, 2, structured=True)
    top = m.norm(dim=0).topk(2).indices
    assert torch.equal(cols[:, top], m[:, top])
    assert int((cols != 0).any(dim=0).sum()) == 2
    assert torch.equal(project_sparse(m, 0, structured=False), torch.zeros_like(m))


# --------------------------------------------------------------------------------------------
# Consistency of every QuantResult


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", METHODS, ids=_method_id)
def test_result_is_consistent(problem, case, layout):
    """weight = deq(codes) (+ H), codes in range, grid shape (rows, n_groups), objective exact."""
    method, options = case
    p = problem(5, 10, 32)
    spec = LAYOUTS[layout]
    result = solve(method, p.weight, p.sigma, bits=3, **spec, **options)
    n_groups = 32 // spec["group_size"] if "group_size" in spec else 1
    assert result.grid.scale.shape == result.grid.zero.shape == (10, n_groups)
    assert result.codes.dtype == torch.uint8 and int(result.codes.max()) <= 7
    assert result.weight.dtype == p.weight.dtype
    expected = result.grid.dequantize(result.codes)
    if result.outliers is not None:
        expected = expected + result.outliers
    assert torch.equal(result.weight, expected)
    # The codes are those of the weight on its own grid (nothing off-grid sneaks in).
    assert torch.equal(result.grid.quantize(result.grid.dequantize(result.codes)), result.codes)
    assert result.objective == pytest.approx(p.objective(result.weight), rel=1e-12)
    if method in ("rtn", "gptq"):
        assert result.objective_start == result.objective
    if layout == "layer" and method != "comq":  # COMQ refits its one scale; others keep min–max
        assert torch.all(result.scale == result.scale[0, 0])


def test_float32_input_gives_float32_result(problem):
    p = problem(6, 8, 16, dtype=torch.float32)
    for method in DECLARED:
        result = solve(method, p.weight, p.sigma.double(), bits=4)
        assert result.weight.dtype == torch.float32
        assert torch.all(torch.isfinite(result.weight))


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("seed", range(4))
def test_quantease_fast_never_above_its_gptq_start(problem, seed, group_size):
    p = problem(seed, 12, 32)
    gptq = solve("gptq", p.weight, p.sigma, bits=3, group_size=group_size, act_order=False)  # its start
    fast = solve("quantease", p.weight, p.sigma, bits=3, group_size=group_size, preset="fast")
    assert fast.objective_start == pytest.approx(gptq.objective, rel=1e-12)
    assert fast.objective <= fast.objective_start * (1 + 1e-12)
    assert torch.equal(fast.grid.scale, gptq.grid.scale)  # CD kept GPTQ's (dynamic-group) grid


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("quantease", {}),
        ("quantease-outlier", {"outlier_fraction": 0.05}),
        ("quantease-outlier", {"outlier_fraction": 0.05, "start": "weight"}),
        ("comq", {}),
        ("comq", {"start": "rtn"}),
    ],
    ids=["quantease-paper", "outlier-rtn", "outlier-weight", "comq-weight", "comq-rtn"],
)
def test_objective_start_is_a_quantized_point(problem, method, options):
    """objective_start is the objective of a grid point; a 'weight' start counts as its rounding,
    so it equals the RTN start's value (and CD methods end at or below it)."""
    p = problem(7, 10, 24)
    result = solve(method, p.weight, p.sigma, bits=3, **options)
    rtn_start = solve(method, p.weight, p.sigma, bits=3, **{**options, "start": "rtn"})
    assert result.objective_start == pytest.approx(rtn_start.objective_start, rel=1e-12)
    assert result.objective_start > 0
    assert result.objective <= result.objective_start * (1 + 1e-12)


def test_diagonal_sigma_makes_everything_rtn(problem):
    """Uncorrelated inputs decouple the coordinates: the exact answer is RTN, and every solver
    must find it (GPTQ with no damping has nothing to propagate; CD's targets are the weights)."""
    p = problem(8, 8, 16)
    sigma = torch.diag(torch.rand(16, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 0.1)
    rtn = solve("rtn", p.weight, sigma, bits=3)
    for method, options in [
        ("gptq", {"damping": 0.0}),
        ("quantease", {}),
        ("quantease", {"preset": "fast", "damping": 0.0}),
        ("comq", {"update_scales": False}),
    ]:
        result = solve(method, p.weight, sigma, bits=3, **options)
        assert torch.equal(result.codes, rtn.codes), (method, options)


def test_quantease_paper_runs_its_schedule(problem):
    p = problem(9, 6, 16)
    result = solve("quantease", p.weight, p.sigma, bits=3)
    assert result.sweeps == 30 and len(result.history) == 30
    rtn = solve("rtn", p.weight, p.sigma, bits=3)
    assert result.objective_start == pytest.approx(rtn.objective, rel=1e-12)


def test_method_options_list_keyword_options():
    assert {"preset", "sweeps", "order", "start", "relaxed", "block_size"} <= set(method_options("quantease"))
    assert {"scalar", "iterations", "update_scales"} <= set(method_options("comq"))
    assert {"outlier_fraction", "structured", "iterations", "final_sweeps"} <= set(
        method_options("quantease-outlier")
    )
    assert {"damping", "block_size", "act_order"} <= set(method_options("gptq"))
    assert method_options("rtn") == []
