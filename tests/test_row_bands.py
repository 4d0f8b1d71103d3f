"""Every choice a row-separable solver makes is a row's own: a band of rows solved alone makes the
whole layer's choices for those rows (the same codes; the same values up to the matrix products'
rounding, which BLAS may do differently for a band than for the whole layer: that is why every run
solves a layer in the same bands, :func:`cdq_cli.solvers.bands.row_bands`, and why several ranks
sharing a layer's bands write one process's bytes; tests/test_distributed.py checks those bytes).

Rows never interact in ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)``; cdq's start, its sweeps' stops and its refits
are decided row by row (a per-layer grid decides for the layer), and GPTQ and RTN never looked
across rows. Checked on fresh random problems (float64 and float32, every visiting order, the
refit options, two rounds, a GGUF block type) and on the real stories260K layers.
"""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers import solve
from cdq_cli.solvers.bands import row_bands
from cdq_cli.solvers.cd import cd_row_sweeps, order_permutation
from cdq_cli.solvers.cdq import best_start
from cdq_cli.solvers.grid import GridSpec
from cdq_cli.solvers.result import exact_row_objectives, row_objectives

BANDS = [(0, 5), (5, 6), (6, 17), (17, 24)]


def _problem(seed: int, rows: int = 24, columns: int = 48, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(columns, 4 * columns, generator=gen, dtype=torch.float64)
    mix = torch.eye(columns, dtype=torch.float64) + 0.3 * torch.randn(
        columns, columns, generator=gen, dtype=torch.float64
    )
    x = (mix @ x) * torch.rand(columns, 1, generator=gen, dtype=torch.float64).add(0.2)
    weight = torch.randn(rows, columns, generator=gen, dtype=torch.float64)
    weight[3, 0] = 6.0
    return weight.to(dtype), (x @ x.T).to(dtype)


def _assert_bands_equal_whole(method: str, weight, sigma, bands=BANDS, **options) -> None:
    whole = solve(method, weight, sigma, **options)
    rtol = 1e-10 if weight.dtype == torch.float64 else 2e-5
    for lo, hi in bands:
        band = solve(method, weight[lo:hi], sigma, **options)
        assert torch.equal(band.codes, whole.codes[lo:hi]), (lo, hi)
        assert torch.allclose(band.weight, whole.weight[lo:hi], rtol=rtol, atol=0), (lo, hi)
        assert torch.allclose(band.grid.scale, whole.grid.scale[lo:hi], rtol=rtol, atol=0), (lo, hi)
        assert torch.equal(band.grid.zero, whole.grid.zero[lo:hi]), (lo, hi)
        if whole.row_objective is not None:
            assert torch.allclose(band.row_objective, whole.row_objective[lo:hi], rtol=1e3 * rtol), (lo, hi)


CDQ_CONFIGS = [
    dict(bits=3),
    dict(bits=4, sym=True),
    dict(bits=2, group_size=16),
    dict(bits=3, order="cyclic"),
    dict(bits=3, order="greedy"),
    dict(bits=3, refit="scales"),
    dict(bits=3, rounds=2),
    dict(bits=4, sym=True, sweeps=1),
    dict(bits=3, tolerance=0.05),
]


@pytest.mark.parametrize("config", CDQ_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cdq_band_is_the_whole_layers_rows(config, dtype):
    weight, sigma = _problem(0, dtype=dtype)
    _assert_bands_equal_whole("cdq", weight, sigma, **config)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_gptq_and_rtn_bands_are_the_whole_layers_rows(method):
    weight, sigma = _problem(1, dtype=torch.float32)
    _assert_bands_equal_whole(method, weight, sigma, bits=3)


def test_cdq_band_on_a_gguf_block_type_is_the_whole_layers_rows():
    weight, sigma = _problem(2, rows=12, columns=256, dtype=torch.float32)
    _assert_bands_equal_whole("cdq", weight, sigma, [(0, 4), (4, 12)], spec=GridSpec.of_type("Q4_K"))


def test_cdq_bands_on_real_layers_are_the_whole_layers_rows(stories_layers):
    for layer in stories_layers[:7]:
        weight, sigma = layer.weight.float(), layer.sigma.float()
        rows = weight.shape[0]
        cuts = [(0, rows // 3), (rows // 3, rows // 2), (rows // 2, rows)]
        _assert_bands_equal_whole("cdq", weight, sigma, cuts, bits=3)


def test_row_objectives_are_each_rows_objective():
    weight, sigma = _problem(3)
    approx = solve("rtn", weight, sigma, bits=3).weight
    exact = exact_row_objectives(weight, approx, sigma)
    for i in range(weight.shape[0]):
        e = (weight[i] - approx[i]).unsqueeze(0)
        assert float(exact[i]) == pytest.approx(float((e @ sigma @ e.T).item()), rel=1e-12)
    assert torch.allclose(row_objectives(weight, approx, sigma), exact, rtol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_row_objectives_are_each_rows_objective(act_order):
    """GPTQ's free objective (‖e‖² less the damping term) holds row by row."""
    weight, sigma = _problem(4)
    result = solve("gptq", weight, sigma, bits=3, act_order=act_order)
    assert torch.allclose(result.row_objective, exact_row_objectives(weight, result.weight, sigma), rtol=1e-9)
    assert result.objective == pytest.approx(float(result.row_objective.sum()), rel=1e-15)


def test_cdq_start_is_the_lower_start_of_every_row():
    weight, sigma = _problem(5)
    spec = GridSpec(3)
    approx, grid, values, picks = best_start(("gptq", "gptq-actorder-clip"), weight, sigma, spec)
    plain = solve("gptq", weight, sigma, bits=3, act_order=False)
    assert set(picks) == {"gptq", "gptq-actorder-clip"}  # this problem mixes them
    assert torch.all(values <= plain.row_objective * (1 + 1e-12))
    assert torch.allclose(values, exact_row_objectives(weight, approx, sigma), rtol=1e-9)
    assert torch.equal(grid.round(approx), approx)


def test_row_sweeps_stop_row_by_row():
    """A row's sweeps end at its own fixed point or budget; another row's budget changes nothing
    for it; every row's objective is its sweep log's, and none rises."""
    weight, sigma = _problem(6)
    spec = GridSpec(3)
    approx, grid, values, _ = best_start(("gptq",), weight, sigma, spec)
    order = order_permutation("diag", weight, sigma)
    budgets = torch.full((weight.shape[0],), 50)
    run = cd_row_sweeps(weight, sigma, grid, approx, values, budgets=budgets, order=order)
    assert bool(run.fixed.all()) and int(run.sweeps.max()) < 50
    assert torch.allclose(run.values, exact_row_objectives(weight, run.approx, sigma), rtol=1e-9)
    assert torch.all(run.values <= values * (1 + 1e-12))
    one = budgets.clone()
    one[::2] = 1  # even rows: one sweep only
    short = cd_row_sweeps(weight, sigma, grid, approx, values, budgets=one, order=order)
    assert torch.equal(short.approx[1::2], run.approx[1::2])
    assert torch.all(short.sweeps[::2] == 1)
    skipped = budgets.clone()
    skipped[:4] = 0
    partial = cd_row_sweeps(weight, sigma, grid, approx, values, budgets=skipped, order=order)
    assert torch.equal(partial.approx[:4], approx[:4]) and torch.equal(partial.approx[4:], run.approx[4:])


def test_per_layer_grid_decides_for_the_whole_layer():
    """A per-layer grid keeps one scale for every row after cdq's per-row machinery."""
    weight, sigma = _problem(7)
    result = solve("cdq", weight, sigma, bits=3, per_layer=True)
    assert torch.all(result.grid.scale == result.grid.scale[0, 0])
    assert torch.all(result.grid.zero == result.grid.zero[0, 0])
    assert result.objective <= result.objective_start * (1 + 1e-12)


@pytest.mark.parametrize("rows", [1, 7, 192, 256, 257, 576, 1536, 5632, 28672])
def test_row_bands_cover_the_rows_in_few_aligned_bands(rows):
    for device, most in (("cpu", 512), ("cuda", 4096)):
        bands = row_bands(rows, device)
        assert bands[0][0] == 0 and bands[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:], strict=False))
        assert all(hi - lo <= most for lo, hi in bands)
        assert len(bands) == -(-rows // most)  # as few as the limit allows
        assert all(lo % 8 == 0 for lo, _ in bands)
