"""Closed-form least-squares refits of a grid once the integer codes are fixed.

With codes c fixed, Ŵ_ij = s_ig (c_ij − z_ig) is linear in the scales, and — writing
``Ŵ = s ⊙ c + m`` with ``m = −s z`` — linear in (s, m) jointly. So the objective
``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` is minimised by a small normal system per row (one or two unknowns per
group), or one system for a per-layer grid. A scale refit never increases the objective; a
zero-point refit is followed by rounding z to an integer (what packed formats store), so callers
keep it only when it helps.
"""

from __future__ import annotations

import torch

from .grid import Grid


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
    lhs = _normal_blocks(levels, sigma, n_groups)
    sw = weight @ sigma if wsigma is None else wsigma
    rhs = _group_sums(levels * sw, n_groups)
    return _positive_scales(grid, _solve_rows(lhs, rhs, grid.scale.double()), grid.zero.clone())


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
    size = columns // n_groups
    c = codes.to(weight.dtype)
    normal, cross = _products(c, sigma, n_groups)
    block_sums = sigma.reshape(n_groups, size, n_groups, size).sum(dim=(1, 3), dtype=torch.float64)  # S[g, h]
    lhs = torch.empty(rows, 2 * n_groups, 2 * n_groups, dtype=torch.float64, device=c.device)
    lhs[:, :n_groups, :n_groups] = normal
    lhs[:, :n_groups, n_groups:] = cross
    lhs[:, n_groups:, :n_groups] = cross.transpose(1, 2)
    lhs[:, n_groups:, n_groups:] = block_sums
    sw = weight @ sigma if wsigma is None else wsigma
    rhs_c, rhs_1 = _group_sums(c * sw, n_groups), _group_sums(sw, n_groups)
    old_scale = grid.scale.double()
    offset = -old_scale * grid.zero.double()
    solution = _solve_rows(lhs, torch.cat([rhs_c, rhs_1], dim=1), torch.cat([old_scale, offset], dim=1))
    scale, offset = solution[:, :n_groups], solution[:, n_groups:]
    ok = (scale > 0).all(dim=1, keepdim=True)
    zero = torch.where(ok, torch.round(-offset / scale.where(ok, torch.ones_like(scale))), grid.zero.double())
    zero = zero.clamp(0, grid.spec.maxq)
    # The scales for these integer zeros, from the sums above (levels c − z).
    zg, zh = zero.unsqueeze(2), zero.unsqueeze(1)
    lhs_lv = normal - zh * cross - zg * cross.transpose(1, 2) + zg * zh * block_sums
    rhs_lv = rhs_c - zero * rhs_1
    return _positive_scales(grid, _solve_rows(lhs_lv, rhs_lv, old_scale), zero.to(grid.zero.dtype))
