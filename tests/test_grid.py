"""Uniform grids: the min–max fit, and that quantize/dequantize is exact nearest-point rounding."""

from __future__ import annotations

import pytest
import torch

from cdq_cli.solvers import SUPPORTED_BITS, Grid, GridSpec, fit_minmax
from cdq_cli.solvers.grid import cast

LAYOUTS = {
    "channel": {},
    "group": {"group_size": 8},
    "layer": {"per_layer": True},
}


def _weights(seed: int, rows: int = 6, columns: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=gen, dtype=torch.float64)
    w[1] = w[1].abs() + 0.1  # an all-positive row: its range is stretched to include zero
    w[2] = -w[2].abs()  # an all-negative row
    w[3] *= 10.0  # rows of very different magnitude (matters per layer)
    return w


def _all_levels(grid: Grid, columns: int) -> torch.Tensor:
    """Every representable value of every entry: (rows, columns, 2**bits)."""
    scale, zero = grid.expand(columns)
    codes = torch.arange(grid.spec.maxq + 1, dtype=scale.dtype)
    return scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_is_nearest_grid_point_brute_force(bits, sym, layout):
    """dequantize(quantize(w)) must be the nearest of all 2**bits levels, inside and outside the range."""
    w = _weights(bits)
    grid = fit_minmax(w, GridSpec(bits=bits, sym=sym, **LAYOUTS[layout]))
    gen = torch.Generator().manual_seed(100 + bits)
    # Also values beyond the fitted range, which must clamp to the end levels.
    probe = torch.cat([w, 1.7 * w + 0.3 * torch.randn(w.shape, generator=gen, dtype=w.dtype)])
    probe_grid = Grid(grid.spec, torch.cat([grid.scale] * 2), torch.cat([grid.zero] * 2))
    codes = probe_grid.quantize(probe)
    assert codes.dtype == torch.uint8
    assert int(codes.max()) <= 2**bits - 1
    rounded = probe_grid.dequantize(codes)
    levels = _all_levels(probe_grid, probe.shape[1])
    best = (levels - probe.unsqueeze(-1)).abs().min(dim=-1).values
    dist = (rounded - probe).abs()
    assert torch.all(dist <= best + 1e-12 * probe.abs().clamp_min(1))
    # The rounded value is one of the levels (not merely as close as one).
    on_level = (levels - rounded.unsqueeze(-1)).abs().min(dim=-1).values
    assert torch.all(on_level <= 1e-12 * probe.abs().clamp_min(1))
    assert torch.equal(probe_grid.round(probe), rounded)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_fitted_weights_within_half_step(bits, sym, layout):
    """Min–max means no fitted weight is clamped: rounding error is at most half a step."""
    w = _weights(bits + 10)
    grid = fit_minmax(w, GridSpec(bits=bits, sym=sym, **LAYOUTS[layout]))
    scale, _ = grid.expand(w.shape[1])
    assert torch.all((grid.round(w) - w).abs() <= scale / 2 * (1 + 1e-9))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_grid_shapes_and_zero_points(bits, sym, layout):
    """Scale/zero are (rows, n_groups), scales positive, zero-points integers in range."""
    rows, columns = 6, 32
    w = _weights(bits, rows, columns)
    spec = GridSpec(bits=bits, sym=sym, **LAYOUTS[layout])
    grid = fit_minmax(w, spec)
    n_groups = columns // 8 if layout == "group" else 1
    assert grid.scale.shape == grid.zero.shape == (rows, n_groups)
    assert torch.all(grid.scale > 0)
    assert torch.equal(grid.zero, grid.zero.round())
    assert torch.all((grid.zero >= 0) & (grid.zero <= spec.maxq))
    if sym:
        assert torch.all(grid.zero == 2 ** (bits - 1))
    if layout == "layer":
        assert torch.all(grid.scale == grid.scale[0, 0])
        assert torch.all(grid.zero == grid.zero[0, 0])


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_group_grid_is_channel_grid_of_each_group(bits, sym):
    """A group's grid is exactly the per-channel grid of that slice of columns."""
    w = _weights(bits)
    grouped = fit_minmax(w, GridSpec(bits=bits, sym=sym, group_size=8))
    for g in range(4):
        alone = fit_minmax(w[:, 8 * g : 8 * g + 8].contiguous(), GridSpec(bits=bits, sym=sym))
        assert torch.equal(grouped.scale[:, g : g + 1], alone.scale)
        assert torch.equal(grouped.zero[:, g : g + 1], alone.zero)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_zero_range_rows(bits, sym):
    """All-zero and constant rows get a usable (positive, finite) scale and round exactly."""
    w = torch.zeros(4, 16, dtype=torch.float64)
    w[1] = 0.75  # constant positive row
    w[2] = -2.5  # constant negative row
    w[3, 5] = 1e-3  # a single tiny nonzero
    grid = fit_minmax(w, GridSpec(bits=bits, sym=sym))
    assert torch.all(torch.isfinite(grid.scale)) and torch.all(grid.scale > 0)
    rounded = grid.round(w)
    assert torch.all(torch.isfinite(rounded))
    assert torch.all(rounded[0] == 0)
    assert torch.all(rounded[3, torch.arange(16) != 5] == 0)
    if not sym:  # asym grids represent a one-sided range end exactly (to rounding)
        torch.testing.assert_close(rounded[1:3], w[1:3], rtol=1e-12, atol=0)
    else:
        scale, _ = grid.expand(16)
        assert torch.all((rounded - w).abs() <= scale / 2 * (1 + 1e-9))


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_spec_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bit width"):
        GridSpec(bits=bits)


def test_spec_rejects_bad_grouping():
    """A group size must be positive, divide the width, and not combine with a per-layer grid."""
    with pytest.raises(ValueError, match="positive"):
        GridSpec(bits=4, group_size=0)
    with pytest.raises(ValueError, match="per-layer"):
        GridSpec(bits=4, group_size=8, per_layer=True)
    with pytest.raises(ValueError, match="divide"):
        fit_minmax(torch.randn(3, 12), GridSpec(bits=4, group_size=8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cast_equals_torch_conversion(dtype: torch.dtype) -> None:
    """The numpy route of ``cast`` gives torch's own conversion bit for bit, both ways, on every
    code 0..255 and on non-contiguous views (a grouped reshape, a transpose)."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (33, 64), generator=gen, dtype=torch.uint8)
    codes[1:5].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    for view in (codes, codes.reshape(33, 4, 16), codes.T, codes[:, ::3]):
        floats = cast(view, dtype)
        assert floats.dtype == dtype and torch.equal(floats, view.to(dtype))
        back = cast(floats, torch.uint8)
        assert back.dtype == torch.uint8 and torch.equal(back, view)
    floats = codes.to(dtype)
    assert cast(floats, dtype).data_ptr() != floats.data_ptr()  # always a new tensor


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_quantize_and_dequantize_equal_the_formula(bits: int) -> None:
    """Grid.quantize/dequantize (numpy casts on the CPU) equal the module doc's formula computed
    with torch's own conversions, bit for bit, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        w = _weights(bits, rows=7, columns=64).to(dtype)
        grid = fit_minmax(w, GridSpec(bits, group_size=16))
        scale, zero = grid.expand(64)
        codes = (w / scale).round().add(zero).clamp(0, grid.spec.maxq).to(torch.uint8)
        assert torch.equal(grid.quantize(w), codes)
        assert torch.equal(grid.dequantize(codes), (codes.to(dtype) - zero) * scale)


def test_numpy_route_equals_torch_route_with_zero_scales_and_nan() -> None:
    """codes_of/dequantized through numpy (CPU) equal torch's own ops, including the inf/NaN a
    zero scale or a NaN weight gives (silently, as torch: no numpy warning escapes)."""
    import warnings

    from cdq_cli.solvers.grid import codes_of, dequantized

    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        w = torch.randn(6, 40, generator=gen, dtype=dtype)
        w[0, 3] = float("nan")
        scale = torch.rand(6, 1, generator=gen, dtype=dtype) + 0.01
        scale[2] = 0.0
        zero = torch.full((6, 1), 7.0, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fast = codes_of(w, scale, zero, 15)
            slow = (w / scale).round_().add_(zero).clamp_(0, 15)
            assert torch.equal(fast.isnan(), slow.isnan()) and torch.equal(
                fast.nan_to_num(), slow.nan_to_num()
            )
            codes = torch.randint(0, 16, (6, 40), generator=gen, dtype=torch.uint8)
            assert torch.equal(dequantized(codes, scale, zero), codes.to(dtype).sub_(zero).mul_(scale))
