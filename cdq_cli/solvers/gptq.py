"""GPTQ (Frantar et al., arXiv 2210.17323): one pass of optimal-brain-quantization updates.

Columns are quantized in order; each one's rounding error is spread over the columns not yet
quantized through the upper Cholesky factor of H⁻¹ (H = Σ + damping), with lazy block updates.
With ``act_order`` columns go by decreasing diag Σ; the group grids are then fitted up front from
W ("static groups") so that every group keeps its natural columns, which is what a packed
checkpoint with ``g_idx`` in natural order can hold. Without it, a group's grid is fitted when its
first column is reached, on the error-updated weights (the reference behaviour).
"""

from __future__ import annotations

import time

import torch

from .grid import Grid, GridSpec, _minmax_params, fit_minmax
from .result import QuantResult, damp, objective


def gptq_hinv(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (Σ + λ·mean(diag Σ)·I)⁻¹, dead columns made harmless."""
    h = damp(sigma, damping).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            "GPTQ could not factor Σ (not positive definite); raise the damping (e.g. damping=0.1)"
        ) from exc


def solve_gptq(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    fixed_grid: Grid | None = None,
) -> QuantResult:
    """GPTQ on ``spec``'s grid; ``fixed_grid`` forces a given grid (used to start CD from GPTQ)."""
    began = time.perf_counter()
    rows, columns = weight.shape
    n_groups = spec.n_groups(columns)
    static = fixed_grid is not None or act_order or spec.per_layer or spec.group_size is None
    grid = fixed_grid if fixed_grid is not None else fit_minmax(weight, spec)
    scale_full, zero_full = grid.expand(columns)
    perm = torch.argsort(sigma.diagonal(), descending=True, stable=True) if act_order else None
    w = weight.clone()
    h = sigma
    if perm is not None:
        w, h = w[:, perm], sigma[perm][:, perm]
        scale_full, zero_full = scale_full[:, perm], zero_full[:, perm]
    hinv = gptq_hinv(h, damping)
    # Transposed working copies, (columns, rows): "column j for every row" is a contiguous vector.
    w_t = w.T.contiguous()
    approx_t = torch.zeros_like(w_t)
    scale_t, zero_t = scale_full.T.contiguous(), zero_full.T.contiguous()
    group_scale = grid.scale.clone()
    group_zero = grid.zero.clone()
    diag = hinv.diagonal().tolist()
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        w_blk = w_t[b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for jl in range(b1 - b0):
            j = b0 + jl
            if not static and j % spec.group_size == 0:
                # Dynamic groups: fit this group's grid on the error-updated weights.
                g = j // spec.group_size
                span = torch.cat([w_blk[jl:], w_t[b1:]], dim=0)[: spec.group_size]
                s, z = _minmax_params(span.amin(dim=0), span.amax(dim=0), spec)
                group_scale[:, g], group_zero[:, g] = s, z
                scale_t[j : j + spec.group_size] = s
                zero_t[j : j + spec.group_size] = z
            col = w_blk[jl]
            # round(w / s) + z, as Grid.quantize does: a division, so exact ties round the same way
            codes = torch.div(col, scale_t[j]).round_().add_(zero_t[j]).clamp_(0, spec.maxq)
            q = codes.sub_(zero_t[j]).mul_(scale_t[j])
            approx_t[j] = q
            err = torch.sub(col, q, out=err_blk[jl]).div_(diag[j])
            if jl + 1 < b1 - b0:
                w_blk[jl + 1 :].addr_(hinv_blk[jl, jl + 1 :], err, alpha=-1)
        w_t[b1:].addmm_(hinv[b0:b1, b1:].T, err_blk, alpha=-1)
    approx = approx_t.T
    if perm is not None:
        approx = approx[:, torch.argsort(perm)]
    grid = Grid(spec, group_scale, group_zero) if not static else grid
    assert grid.scale.shape == (rows, n_groups)
    codes = grid.quantize(approx)
    approx = grid.dequantize(codes)
    value = objective(weight, approx, sigma)
    return QuantResult("gptq", approx, codes, grid, value, value, seconds=time.perf_counter() - began)
