"""Grids of the GGUF block types: stored scales → an exact affine grid per sub-block, the start grid
(llama.cpp's own choice), and refits that keep the stored widths.

A fitted block type is, per sub-block g of a row, the affine grid ``ŵ = s_g·(c − z) + M_g`` (see
:mod:`.gguf_types` for how ``s_g`` and ``M_g`` come from the stored fp16 ``d``/``dmin``/``m`` and
the 4-, 6- or 8-bit sub-block scales and mins). :func:`grid_of` computes ``s_g`` and ``M_g`` in
float32 exactly as llama.cpp and gguf-py dequantize (``d·sc`` and ``dmin·mn`` are exact float32
products, so ``s·c + M`` is gguf-py's ``d·q − dm`` to the bit).

The solvers work on such a grid unchanged: the objective ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` is the same
for ``W − M`` and ``Ŵ − M``, so the coordinate-descent and GPTQ kernels round ``W − M`` on the
offset-free grid ``s·(c − z)`` with their usual formula and ``M`` is added back
(:meth:`Grid.without_offset`). The codes are the solver's own.

Start grid (:func:`fit`): llama.cpp's importance-matrix choice of the stored scales
(:func:`.llama_fit.fit_parts` with diag Σ as the importance), made usable for a solver by
:func:`usable`: a zero scale (llama.cpp writes one for an all-zero block or a sub-block whose scale
rounds to 0) becomes the smallest non-zero one, which keeps every value the zero scale could give
(``c = z``, or ``c = 0`` with the offset) and adds others, so rounding on it is never worse.

Refits (:func:`refit`): with the codes fixed the objective is quadratic in the sub-block scales and
offsets; the joint least-squares solution (the normal systems of :mod:`.lsq`) is then stored as the
type stores it: fp16 ``d``, ``dmin``/``m`` and the sub-block scales/mins rounded to their widths
(:func:`quantize_scales`), with the offsets re-solved for the rounded scales. Rounding can undo the
gain, so a caller keeps a refit only when the objective decreases (cdq's ``descend`` and COMQ do).
"""

from __future__ import annotations

import torch

from .gguf_types import BlockType, block_type
from .grid import Grid, GridSpec
from .llama_fit import fit_parts, nearest_int
from .lsq import _block_sums, _group_sums, _products, _row_tiles, _solve_rows

F32 = torch.float32
# The smallest normal float16: a zero fp16 scale becomes this (see the module docstring).
_TINY = 2.0**-14


def grid_of(spec: GridSpec, parts: dict[str, torch.Tensor]) -> Grid:
    """The exact grid of stored scales ``parts`` (float32 ``scale``, ``zero``, ``offset``)."""
    kind = block_type(spec.block_type or "")
    d = parts["d"].to(F32)
    if kind.k_quant:
        d = d.repeat_interleave(kind.sub_blocks, dim=1)
        scale = d * parts["scales"].to(F32)
    else:
        scale = d
    offset = None
    if not kind.symmetric:
        if kind.k_quant:
            dmin = parts["dmin"].to(F32).repeat_interleave(kind.sub_blocks, dim=1)
            offset = -(dmin * parts["mins"].to(F32))
        else:
            offset = parts["m"].to(F32)
    zero = torch.full_like(scale, float(kind.zero))
    return Grid(spec, scale, zero, offset, dict(parts))


def usable(name: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``parts`` with no zero effective scale (see the module docstring); a copy."""
    kind = block_type(name)
    out = {key: value.clone() for key, value in parts.items()}
    tiny = torch.tensor(_TINY, dtype=torch.float16, device=out["d"].device)
    out["d"] = torch.where(out["d"] == 0, tiny, out["d"])
    if kind.k_quant:
        out["scales"] = torch.where(out["scales"] == 0, torch.ones_like(out["scales"]), out["scales"])
    return out


def fit(weight: torch.Tensor, spec: GridSpec, importance: torch.Tensor | None = None) -> Grid:
    """The start grid of ``weight`` (rows, columns) for a block-type ``spec``: llama.cpp's choice
    (importance-weighted when ``importance`` is given), made usable for a solver.

    The last result is kept for the same (unmodified) tensors: a run solves a layer and then
    rounds it to nearest on the same start grid for its report, and the fit is the costly part."""
    name = spec.block_type
    if name is None:
        raise ValueError("fit needs a GGUF block type")
    spec.n_groups(weight.shape[1])
    last = _LAST_FIT[0] if _LAST_FIT else None
    if (
        last is not None
        and last[0] == spec
        and last[1] is weight  # held here, so its storage cannot have been reused
        and last[2] == weight._version
        and (
            (last[3] is None and importance is None)
            or (last[3] is not None and importance is not None and torch.equal(last[3], importance))
        )
    ):
        return last[4]
    grid = grid_of(spec, usable(name, fit_parts(weight, name, importance)))
    _LAST_FIT[:] = [(spec, weight, weight._version, None if importance is None else importance.clone(), grid)]
    return grid


_LAST_FIT: list = []  # (spec, weight, its version, importance, grid) of the last fit


def importance_of(sigma: torch.Tensor) -> torch.Tensor:
    """The importance of each input column, from Σ: its diagonal (llama.cpp's imatrix up to a
    factor), plus 1e-6 of its mean so that a block of dead columns (Σ_jj = 0) is fitted like an
    unweighted one instead of collapsing to a zero scale."""
    diag = sigma.diagonal().to(F32).clamp_min(0)
    return diag + 1e-6 * diag.mean()


def codes_of(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest codes of ``weight`` on ``grid``; a sub-block whose scale is zero (only in
    llama.cpp's own reference fits) gets code ``z`` (its value does not depend on the code)."""
    dead = grid.scale == 0
    if not bool(dead.any()):
        return grid.quantize(weight)
    safe = Grid(grid.spec, torch.where(dead, torch.ones_like(grid.scale), grid.scale), grid.zero, grid.offset)
    codes = safe.quantize(weight)
    columns = weight.shape[1]
    dead_full = dead.repeat_interleave(columns // dead.shape[1], dim=1)
    return torch.where(dead_full, torch.full_like(codes, int(block_type(grid.spec.block_type).zero)), codes)


def quantize_scales(
    kind: BlockType, scale: torch.Tensor, offset: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Stored scales for continuous per-sub-block ``scale`` (and ``offset``), both (rows, groups):
    what the type can hold nearest to them (llama.cpp's rule for the sub-block scales: the block's
    largest maps to the top of the width; each is rounded relative to the float16 ``d``).
    ``offset`` of a k-quant is stored as ``−dmin·mn`` with ``mn ≥ 0``: positive offsets clip to 0."""
    rows, groups = scale.shape
    scale = scale.to(F32)
    if not kind.k_quant:
        parts = {"d": scale.to(torch.float16)}
        if not kind.symmetric:
            parts["m"] = offset.to(F32).to(torch.float16)
        return parts
    blocks = groups // kind.sub_blocks
    sub = scale.reshape(rows, blocks, kind.sub_blocks)
    if kind.signed_scales:
        low = -(2 ** (kind.scale_bits - 1))
        high = 2 ** (kind.scale_bits - 1) - 1
        peak = sub.gather(-1, sub.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        d = (peak / low).to(torch.float16)
        d32 = torch.where(d == 0, torch.ones_like(d), d).to(F32).unsqueeze(-1)
        levels = nearest_int(sub / d32).clamp(low, high)
    else:
        high = 2**kind.scale_bits - 1
        peak = sub.amax(dim=-1).clamp_min(0)
        d = (peak / high).to(torch.float16)
        d32 = torch.where(d == 0, torch.ones_like(d), d).to(F32).unsqueeze(-1)
        levels = nearest_int(sub / d32).clamp(0, high)
    parts = {"d": d, "scales": levels.reshape(rows, groups).to(torch.int16)}
    if not kind.symmetric:
        parts.update(_quantize_mins(kind, offset.to(F32), rows, blocks))
    return parts


def _quantize_mins(kind: BlockType, offset: torch.Tensor, rows: int, blocks: int) -> dict[str, torch.Tensor]:
    high = 2**kind.scale_bits - 1
    mins = (-offset).clamp_min(0).reshape(rows, blocks, kind.sub_blocks)
    peak = mins.amax(dim=-1)
    dmin = (peak / high).to(torch.float16)
    dmin32 = torch.where(dmin == 0, torch.ones_like(dmin), dmin).to(F32).unsqueeze(-1)
    levels = nearest_int(mins / dmin32).clamp(0, high)
    return {"dmin": dmin, "mins": levels.reshape(rows, -1).to(torch.int16)}


def refit(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    codes: torch.Tensor,
    *,
    wsigma: torch.Tensor | None = None,
) -> Grid:
    """A refit of a block-type ``grid`` for fixed ``codes`` that the type can store (see the module
    docstring): continuous least squares for the scales (and offsets), rounded to the stored
    widths, offsets re-solved for the rounded scales and rounded. Not guaranteed to lower the
    objective: callers compare."""
    kind = block_type(grid.spec.block_type or "")
    rows, columns = weight.shape
    groups = grid.scale.shape[1]
    sw = weight @ sigma if wsigma is None else wsigma
    levels = codes.to(weight.dtype) - float(kind.zero)  # Ŵ = s ⊙ levels + M
    old_scale = grid.scale.double()
    if kind.symmetric:
        scale = torch.empty_like(old_scale)
        for tile in _row_tiles(rows, groups):
            lhs, _ = _products(levels[tile], sigma, groups)
            rhs = _group_sums(levels[tile] * sw[tile], groups)
            scale[tile] = _solve_rows(lhs, rhs, old_scale[tile])
        parts = quantize_scales(kind, scale, None)
        return grid_of(grid.spec, usable(kind.name, parts)).to(weight.device, weight.dtype)
    old_offset = grid.offset.double()
    block = _block_sums(sigma, groups)
    scale = torch.empty_like(old_scale)
    for tile in _row_tiles(rows, 2 * groups):
        normal, cross = _products(levels[tile], sigma, groups)
        n = normal.shape[0]
        lhs = torch.empty(n, 2 * groups, 2 * groups, dtype=torch.float64, device=weight.device)
        lhs[:, :groups, :groups] = normal
        lhs[:, :groups, groups:] = cross
        lhs[:, groups:, :groups] = cross.transpose(1, 2)
        lhs[:, groups:, groups:] = block
        rhs = torch.cat([_group_sums(levels[tile] * sw[tile], groups), _group_sums(sw[tile], groups)], dim=1)
        fallback = torch.cat([old_scale[tile], old_offset[tile]], dim=1)
        scale[tile] = _solve_rows(lhs, rhs, fallback)[:, :groups]
    parts = usable(kind.name, quantize_scales(kind, scale, old_offset))
    rounded = grid_of(grid.spec, parts)
    offset = _offsets_for(weight, sigma, rounded, levels, block, sw, old_offset)
    if kind.k_quant:
        parts.update(_quantize_mins(kind, offset.to(F32), rows, groups // kind.sub_blocks))
    else:
        parts["m"] = offset.to(F32).to(torch.float16)
    return grid_of(grid.spec, parts).to(weight.device, weight.dtype)


def _offsets_for(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    levels: torch.Tensor,
    block: torch.Tensor,
    sw: torch.Tensor,
    fallback: torch.Tensor,
) -> torch.Tensor:
    """The offsets minimising the objective for fixed scales and codes: ``Ŵ = s ⊙ levels + M`` with
    ``M`` constant per group, so ``Σ_h S[g, h] M_h = Σ_{a∈g} ((W − s ⊙ levels) Σ)_a`` with ``S`` the
    group sums of Σ (one matrix for every row)."""
    rows, columns = weight.shape
    groups = grid.scale.shape[1]
    fitted = grid.scale.to(weight.dtype).repeat_interleave(columns // groups, dim=1) * levels
    rhs = _group_sums(sw - fitted @ sigma, groups)  # (rows, groups)
    lhs = block.clone()
    dead = lhs.diagonal() <= 0  # a group whose inputs were all zero: keep its offset
    lhs.diagonal().masked_fill_(dead, 1.0)
    rhs = torch.where(dead.unsqueeze(0), fallback, rhs)
    solution, info = torch.linalg.solve_ex(lhs, rhs.T)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        return fallback
    return solution.T
