"""Big layers without whole float64 copies: objectives over Σ slabs and row tiles, per-row
refit systems tile by tile, λ_max in Σ's precision when its float64 copy would not fit.

Each chunked path is compared with the unchunked float64 computation, on fresh random problems
and on real stories260K layers; the tiles themselves are checked to fit the budget.
"""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers import GridSpec, fit_minmax, lsq, outliers, result, solve
from cdq_cli.solvers.grouped import energy
from cdq_cli.solvers.lsq import refit_scales, refit_scales_and_zeros
from cdq_cli.solvers.result import objective, spans


def _whole_float64(weight, approx, sigma) -> float:
    err = (weight - approx).double()
    return float(((err @ sigma.double()) * err).sum())


def _problem(seed: int, rows: int, columns: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * columns, columns, generator=gen) @ torch.randn(columns, columns, generator=gen)
    sigma = (x.T @ x / x.shape[0]).float()
    weight = torch.randn(rows, columns, generator=gen)
    return weight, sigma


@pytest.mark.parametrize("budget", [8, 8 * 40, 8 * 1000, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_objective_equals_float64(seed, budget):
    """Slabs of 1, 5 and 125 columns (and row tiles as small) give the float64 value to rounding."""
    weight, sigma = _problem(seed, 24, 40)
    approx = solve("rtn", weight, sigma, bits=3).weight
    reference = _whole_float64(weight, approx, sigma)
    assert objective(weight, approx, sigma, budget=budget) == pytest.approx(reference, rel=1e-13)


def test_unchunked_objective_is_the_single_product():
    """When Σ's float64 copy fits, the value is bit-for-bit the one product (same as before)."""
    weight, sigma = _problem(2, 16, 32)
    approx = solve("rtn", weight, sigma, bits=2).weight
    assert objective(weight, approx, sigma) == _whole_float64(weight, approx, sigma)


def test_chunked_objective_on_real_layers(stories_layers):
    for layer in stories_layers[:7]:
        approx = solve("rtn", layer.weight, layer.sigma, bits=3).weight
        reference = _whole_float64(layer.weight, approx, layer.sigma)
        chunked = objective(layer.weight, approx, layer.sigma, budget=8 * layer.weight.shape[1] * 7)
        assert chunked == pytest.approx(reference, rel=1e-12), layer.name


@pytest.mark.parametrize(
    "total,item,budget", [(10, 3, 9), (10, 3, 1), (7, 1, 100), (8192, 8 * 28672, 256 << 20)]
)
def test_spans_cover_the_range_within_budget(total, item, budget):
    parts = spans(total, item, budget)
    assert [i for s in parts for i in range(s.start, s.stop)] == list(range(total))
    assert all((s.stop - s.start) * item <= budget or s.stop - s.start == 1 for s in parts)


def test_refit_tiles_fit_the_budget_for_a_70b_down_proj():
    """8,192 rows of a 28,672-wide layer in groups of 128: 13 GB of joint systems at once, tiles
    of at most CHUNK_BYTES instead."""
    n_groups = 28672 // 128
    tiles = lsq._row_tiles(8192, n_groups)
    per_row = lsq._SYSTEMS_PER_ROW * 8 * n_groups * n_groups
    assert len(tiles) > 1
    assert max((s.stop - s.start) * per_row for s in tiles) <= result.CHUNK_BYTES


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiled_refits_equal_untiled(monkeypatch, seed, sym):
    """Row tiles of 1 and 3 rows give the scales and zeros of one tile (each row's system is its own)."""
    weight, sigma = _problem(seed, 10, 48)
    spec = GridSpec(3, 16, sym)
    grid = fit_minmax(weight, spec)
    codes = grid.quantize(weight)
    whole_scales = refit_scales(weight, sigma, grid, codes)
    whole_joint = refit_scales_and_zeros(weight, sigma, grid, codes)
    for rows_per_tile in (1, 3):
        monkeypatch.setattr(result, "CHUNK_BYTES", rows_per_tile * lsq._SYSTEMS_PER_ROW * 8 * 9)
        assert len(lsq._row_tiles(10, 3)) == -(-10 // rows_per_tile)
        tiled_scales = refit_scales(weight, sigma, grid, codes)
        tiled_joint = refit_scales_and_zeros(weight, sigma, grid, codes)
        torch.testing.assert_close(tiled_scales.scale, whole_scales.scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(tiled_joint.scale, whole_joint.scale, rtol=1e-6, atol=0)
        assert torch.equal(tiled_joint.zero, whole_joint.zero)


def test_block_sums_equal_the_reshaped_sum():
    _, sigma = _problem(3, 4, 48)
    expected = sigma.double().reshape(3, 16, 3, 16).sum(dim=(1, 3))
    torch.testing.assert_close(lsq._block_sums(sigma, 3), expected, rtol=1e-12, atol=1e-9)


def test_largest_eigenvalue_in_working_precision(monkeypatch):
    _, sigma = _problem(4, 4, 64)
    exact = outliers.largest_eigenvalue(sigma)
    assert exact == pytest.approx(float(torch.linalg.eigvalsh(sigma.double()).max()), rel=1e-14)
    monkeypatch.setattr(outliers, "CHUNK_BYTES", 8)
    assert outliers.largest_eigenvalue(sigma) == pytest.approx(exact, rel=1e-5)


def test_grouped_energy_equals_float64():
    weight, sigma = _problem(5, 12, 16)
    grouped_sigma = torch.stack([sigma, 2 * sigma, 0.5 * sigma])
    grouped_weight = torch.randn(3 * 4, 16, generator=torch.Generator().manual_seed(6))
    zero = torch.zeros(4, 16)
    parts = [_whole_float64(grouped_weight[4 * g : 4 * g + 4], zero, grouped_sigma[g]) for g in range(3)]
    expected = sum(parts)
    assert energy(grouped_weight, grouped_sigma) == pytest.approx(expected, rel=1e-13)
    assert energy(weight, sigma) == _whole_float64(weight, torch.zeros_like(weight), sigma)


@pytest.mark.parametrize("rows_per_tile", [1, 5, 24])
def test_working_products_in_row_tiles(monkeypatch, rows_per_tile):
    """The working-dtype objective and energy taken a row tile at a time (1, 5, all 24 rows) are the
    single float32 product's values to float32 rounding, and exactly it when the layer is one tile."""
    weight, sigma = _problem(3, 24, 40)
    approx = solve("rtn", weight, sigma, bits=3).weight
    err = weight - approx
    whole = (
        float((err @ sigma).mul_(err).sum(dtype=torch.float64)),
        float((weight @ sigma).mul_(weight).sum(dtype=torch.float64)),
    )
    monkeypatch.setattr(result, "TILE_BYTES", rows_per_tile * 40 * 4)
    tiled = (result.working_objective(weight, approx, sigma), result.working_energy(weight, sigma))
    if rows_per_tile == 24:
        assert tiled == whole
    for value, reference, exact in zip(
        tiled,
        whole,
        (_whole_float64(weight, approx, sigma), _whole_float64(weight, 0 * weight, sigma)),
        strict=True,
    ):
        assert value == pytest.approx(reference, rel=1e-5) and value == pytest.approx(exact, rel=1e-5)
