"""Closed-form least-squares refits of a grid once the integer codes are fixed.

With codes c fixed, Ŵ_ij = s_ig (c_ij − z_ig) is linear in the scales, and — writing
``Ŵ = s ⊙ c + m`` with ``m = −s z`` — linear in (s, m) jointly. So the objective
``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` is minimised by a small normal system per row (one or two unknowns per
group), or one system for a per-layer grid. A scale refit never increases the objective; a
zero-point refit is followed by rounding z to an integer (what packed formats store), so callers
keep it only when it helps.

Memory: the per-row systems are dense, (rows, G, G) float64 for G groups, (rows, 2G, 2G) for the
joint refit: 13 GB at 8,192 rows of a 28,672-wide layer in groups of 128. They are formed and
solved for a tile of rows at a time, tiles sized to ``result.CHUNK_BYTES`` (each row's system depends
only on that row), so the result is the same for any tiling.
"""

from __future__ import annotations

import torch

from .grid import Grid
from .result import spans

# float64 (G × G) matrices held per row while a tile is formed and solved: the normal matrix (1),
# the cross term (1), the joint system (4), its copy in _solve_rows (4) and the LU factor (4).
_SYSTEMS_PER_ROW = 14
# Σ's entries summed at a time in float64 (16 MiB of float64)
_SUM_ELEMENTS = 2**21


def _group_sums(values: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum (rows, columns) over each group's columns → (rows, n_groups), in float64: the small
    normal systems are formed and solved in float64 whatever the working dtype."""
    rows, columns = values.shape
    return values.reshape(rows, n_groups, columns // n_groups).sum(dim=2, dtype=torch.float64)


def _solve_rows(lhs: torch.Tensor, rhs: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Solve lhs[i] x = rhs[i]; rows whose system is singular or non-finite keep ``fallback``.

    An unknown whose basis vector is zero under Σ has a zero row and column (Σ is PSD); it is
    pinned to its fallback value by the trivial equation x = fallback.
    """
    lhs = lhs.clone()
    degenerate = lhs.diagonal(dim1=1, dim2=2) <= 0
    lhs.diagonal(dim1=1, dim2=2).masked_fill_(degenerate, 1.0)
    rhs = torch.where(degenerate, fallback, rhs)
    solution, info = torch.linalg.solve_ex(lhs, rhs.unsqueeze(2))
    solution = solution.squeeze(2)
    bad = (info != 0) | ~torch.isfinite(solution).all(dim=1)
    return torch.where(bad.unsqueeze(1), fallback, solution)


def _normal_blocks(basis: torch.Tensor, sigma: torch.Tensor, n_groups: int) -> torch.Tensor:
    """M[i, g, h] = basis_ig Σ basis_ihᵀ where basis_ig is ``basis`` restricted to group g."""
    return _products(basis, sigma, n_groups)[0]


def _products(basis: torch.Tensor, sigma: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` (as :func:`_normal_blocks`) and ``X[i, g, h] = Σ_{a∈g, b∈h} basis_ia Σ_ab`` from
    one pass of products (``basis`` times Σ costs one GEMM in all)."""
    rows, columns = basis.shape
    size = columns // n_groups
    normal = torch.empty(rows, n_groups, n_groups, dtype=torch.float64, device=basis.device)
    cross = torch.empty_like(normal)
    for g in range(n_groups):
        part = basis[:, g * size : (g + 1) * size] @ sigma[g * size : (g + 1) * size]
        normal[:, g, :] = _group_sums(part * basis, n_groups)
        cross[:, g, :] = _group_sums(part, n_groups)
    return normal, cross


def refit_scales(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    codes: torch.Tensor,
    *,
    wsigma: torch.Tensor | None = None,
) -> Grid:
    """The positive scales minimising the objective for fixed ``codes`` and zero-points.

    Rows (or the layer) whose solution is degenerate or not positive keep their old scales.
    ``wsigma``: ``W Σ`` when the caller already has it (it depends on neither codes nor grid).
    """
    rows, columns = weight.shape
    n_groups = grid.scale.shape[1]
    _, zero_full = grid.expand(columns)
    levels = codes.to(weight.dtype) - zero_full  # Ŵ = s ⊙ levels
    if grid.spec.per_layer:
        projected = levels @ sigma
        num, den = (projected * weight).sum(), (projected * levels).sum()
        if den <= 0 or num <= 0:
            return grid
        return Grid(grid.spec, torch.full_like(grid.scale, float(num / den)), grid.zero.clone())
    sw = weight @ sigma if wsigma is None else wsigma
    fallback = grid.scale.double()
    solution = torch.empty_like(fallback)
    for tile in _row_tiles(rows, n_groups):
        lhs = _normal_blocks(levels[tile], sigma, n_groups)
        rhs = _group_sums(levels[tile] * sw[tile], n_groups)
        solution[tile] = _solve_rows(lhs, rhs, fallback[tile])
    return _positive_scales(grid, solution, grid.zero.clone())


def _row_tiles(rows: int, n_groups: int, budget: int | None = None) -> list[slice]:
    """Row tiles whose per-row systems (``_SYSTEMS_PER_ROW`` G × G float64 matrices) fit."""
    return spans(rows, _SYSTEMS_PER_ROW * 8 * n_groups * n_groups, budget)


def _block_sums(sigma: torch.Tensor, n_groups: int) -> torch.Tensor:
    """S[g, h] = the sum of Σ over groups g × h (float64), a few of Σ's rows at a time (a float64
    sum of a float32 tensor converts it whole first: for 8,192 columns, 512 MiB)."""
    columns = sigma.shape[0]
    size = columns // n_groups
    step = max(1, _SUM_ELEMENTS // columns)
    out = torch.zeros(n_groups, n_groups, dtype=torch.float64, device=sigma.device)
    for g in range(n_groups):
        for lo in range(g * size, (g + 1) * size, step):
            slab = sigma[lo : min(lo + step, (g + 1) * size)]
            out[g] += slab.reshape(slab.shape[0], n_groups, size).sum(dim=(0, 2), dtype=torch.float64)
    return out


def _positive_scales(grid: Grid, solution: torch.Tensor, zero: torch.Tensor) -> Grid:
    """Rows with a non-positive scale keep their old scales."""
    solution = solution.to(grid.scale.dtype)
    solution = torch.where((solution <= 0).any(dim=1, keepdim=True), grid.scale, solution)
    return Grid(grid.spec, solution, zero)


def refit_scales_and_zeros(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    codes: torch.Tensor,
    *,
    wsigma: torch.Tensor | None = None,
) -> Grid:
    """Jointly refit scales and zero-points for fixed codes, then round zeros to integers.

    Solves for (s, m) with Ŵ = s ⊙ c + m per group, sets z = clamp(round(−m / s), 0, maxq), and
    refits the scales for those integer zeros. Per-layer grids and symmetric grids (whose zero is
    fixed at the midpoint) only refit their scales.

    Products: ``c Σ`` once (one GEMM) and ``W Σ`` (one, or none when ``wsigma`` is given). The
    second scale refit needs no product: with levels ``c − z``,
    ``M_lv[g, h] = M_c[g, h] − z_h X[g, h] − z_g X[h, g] + z_g z_h S[g, h]`` and
    ``rhs_lv[g] = rhs_c[g] − z_g Σ_{a∈g} (WΣ)_a``, where ``X`` is the cross term of the joint
    system and ``S[g, h]`` the sum of Σ over groups g × h.
    """
    if grid.spec.sym or grid.spec.per_layer:
        return refit_scales(weight, sigma, grid, codes, wsigma=wsigma)
    rows, columns = weight.shape
    n_groups = grid.scale.shape[1]
    c = codes.to(weight.dtype)
    block_sums = _block_sums(sigma, n_groups)  # S[g, h]
    sw = weight @ sigma if wsigma is None else wsigma
    old_scale = grid.scale.double()
    old_offset = -old_scale * grid.zero.double()
    scale_out = torch.empty_like(old_scale)
    zero_out = torch.empty_like(old_scale)
    for tile in _row_tiles(rows, n_groups):
        normal, cross = _products(c[tile], sigma, n_groups)
        n = normal.shape[0]
        lhs = torch.empty(n, 2 * n_groups, 2 * n_groups, dtype=torch.float64, device=c.device)
        lhs[:, :n_groups, :n_groups] = normal
        lhs[:, :n_groups, n_groups:] = cross
        lhs[:, n_groups:, :n_groups] = cross.transpose(1, 2)
        lhs[:, n_groups:, n_groups:] = block_sums
        rhs_c, rhs_1 = _group_sums(c[tile] * sw[tile], n_groups), _group_sums(sw[tile], n_groups)
        fallback = torch.cat([old_scale[tile], old_offset[tile]], dim=1)
        solution = _solve_rows(lhs, torch.cat([rhs_c, rhs_1], dim=1), fallback)
        del lhs
        scale, offset = solution[:, :n_groups], solution[:, n_groups:]
        ok = (scale > 0).all(dim=1, keepdim=True)
        zero = torch.where(
            ok, torch.round(-offset / scale.where(ok, torch.ones_like(scale))), grid.zero[tile].double()
        )
        zero = zero.clamp(0, grid.spec.maxq)
        # The scales for these integer zeros, from the sums above (levels c − z).
        zg, zh = zero.unsqueeze(2), zero.unsqueeze(1)
        lhs_lv = normal - zh * cross - zg * cross.transpose(1, 2) + zg * zh * block_sums
        rhs_lv = rhs_c - zero * rhs_1
        scale_out[tile] = _solve_rows(lhs_lv, rhs_lv, old_scale[tile])
        zero_out[tile] = zero
    return _positive_scales(grid, scale_out, zero_out.to(grid.zero.dtype))
