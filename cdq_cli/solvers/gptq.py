"""GPTQ (Frantar et al., arXiv 2210.17323): one pass of optimal-brain-quantization updates.

Columns are quantized in order; each one's rounding error is spread over the columns not yet
quantized through the upper factor ``U`` of H⁻¹ = Uᵀ U (H = Σ + damping), with lazy block updates.
With ``act_order`` (the default, as GPTQModel and llm-compressor run GPTQ) columns go by
decreasing diag Σ; the group grids are then fitted up front from W ("static groups": each group's
grid comes from its columns in the original order, before the permuted pass) so that every group
keeps its natural columns, which is what a packed checkpoint with ``g_idx`` in natural order
(``column // group_size``, monotone) can hold. Without it (``act_order=False``), a group's grid is
fitted when its first column is reached, on the error-updated weights (the reference behaviour).
cdq's GPTQ starts (:mod:`.starts`) run this same function.

How it is computed (same results as the textbook loop, to floating-point rounding). Only H's own
Cholesky factor is formed: ``H = Ũ Ũᵀ`` with ``Ũ`` upper, so ``U = Ũ⁻¹``. The scaled errors
``e_j = (x_j − q_j) / U_jj`` of the textbook loop satisfy ``W − Q = e U``, hence
``e = (W − Q) Ũ``. For a block b with the columns P before it, ``U_Pb = −U_PP Ũ_Pb U_bb`` and
``e_P U_PP = E_P``, so the textbook's lazily updated weights ``W_b − e_P U_Pb`` are
``W_b + (E_P Ũ_Pb) U_bb`` with ``E = W − Q`` the finished columns' errors: one GEMM against the
finished columns (left-looking) and only the diagonal blocks ``U_bb = Ũ_bb⁻¹`` inverted, where
the textbook form needs all of H⁻¹'s factor (a triangular inverse of H, about as costly as the
GEMMs of the whole pass at p ≤ 2048). Inside the block the in-block kernel runs the textbook loop
with ``U_bb``. The objective is free:
``tr(E H Eᵀ) = e U H Uᵀ eᵀ = ‖e‖²`` (U H Uᵀ = I), so ``tr(E Σ Eᵀ)`` is ``‖e‖²`` less the damping
term, with no product against Σ.

Rows never interact, so on the CPU each thread runs the whole pass on its own rows
(:func:`cdq_cli.kernels.row_spans`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from ..kernels import GPTQ, Block, backend_module, parallel, resolve, row_spans
from .bands import once
from .grid import Grid, GridSpec, _minmax_params, fit_minmax
from .result import QuantResult, cholesky_in_place, damping_term


def _cholesky(
    sigma: torch.Tensor, damping: float, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` lower with ``J H J = L Lᵀ`` for the damped ``H`` in the visiting ``order``, and
    ``H − Σ`` (its diagonal, in that order). ``Ũ = J L J`` is the upper factor the pass needs
    (``H = Ũ Ũᵀ``, so ``H⁻¹ = Ũ⁻ᵀ Ũ⁻¹``); :meth:`_Blocks.of` reads its blocks from ``L`` directly.

    ``H = P (Σ + λ·mean(diag Σ)·I) Pᵀ`` with ``P`` the permutation of ``order`` (none: I) and ``J``
    the order-reversing permutation. Dead columns (a zero diagonal) get a unit diagonal, which
    makes them harmless. ``J P Σ Pᵀ J`` is made in one gather and factored in place (LAPACK's
    ``potrf`` on its column-major view: it is symmetric, so that view holds the same matrix), so
    one Σ-sized matrix exists besides Σ: the factor is the gathered copy's memory.
    """
    if order is None:
        h, diagonal = sigma.flip(0, 1), sigma.diagonal()
    else:
        reverse = order.flip(0)
        h, diagonal = sigma[reverse[:, None], reverse], sigma.diagonal()[order]
    if damping > 0:  # by the mean of Σ's own diagonal, whatever the order (as result.damp)
        h.diagonal().add_(damping_term(sigma, damping))
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    extra = h.diagonal().flip(0) - diagonal
    failure = "GPTQ could not factor Σ (not positive definite); raise the damping (e.g. damping=0.1)"
    return cholesky_in_place(h, failure), extra


@dataclass
class _Blocks:
    """What every row needs from the factor, block by block: columns ``b0:b1``, ``U_bb = Ũ_bb⁻¹``
    (the in-block kernel's matrix) and ``M_b = Ũ_Pb U_bb`` (the finished columns' GEMM), and
    ``Ũ_bb`` itself. That is half of Ũ's storage: the factor is not kept."""

    bounds: list[tuple[int, int]]
    inverse: list[torch.Tensor]
    diag: list[torch.Tensor]
    cross: list[torch.Tensor]
    upper: list[torch.Tensor]

    @classmethod
    def of(cls, lower: torch.Tensor, block_size: int, name: str) -> _Blocks:
        """The blocks of ``Ũ = J L J`` read from ``lower`` = L (:func:`_cholesky`; independent:
        in parallel for backend ``name``). ``Ũ[i, j] = L[n−1−i, n−1−j]``, so a block of Ũ is a
        block of L flipped both ways: each is copied out flipped, and Ũ itself is never formed."""
        columns = lower.shape[0]
        bounds = [(b0, min(b0 + block_size, columns)) for b0 in range(0, columns, block_size)]

        def flipped(r0, r1, c0, c1):  # Ũ[r0:r1, c0:c1]
            return lower[columns - r1 : columns - r0, columns - c1 : columns - c0].flip(0, 1)

        def one(b0, b1):
            ut_bb = flipped(b0, b1, b0, b1)
            eye = torch.eye(b1 - b0, dtype=lower.dtype, device=lower.device)
            u_bb = torch.linalg.solve_triangular(ut_bb, eye, upper=True).contiguous()
            return u_bb, u_bb.diagonal().contiguous(), flipped(0, b0, b0, b1) @ u_bb, ut_bb

        parts = parallel(name, [partial(one, b0, b1) for b0, b1 in bounds])
        return cls(bounds, *(list(column) for column in zip(*parts, strict=True)))

    def factor(self, rows: int, c0: int, c1: int) -> torch.Tensor:
        """``Ũ[:rows, c0:c1]`` rebuilt from the blocks (above a diagonal block, ``Ũ_Pb = M_b Ũ_bb``)."""
        ut = self.upper[0]
        out = ut.new_zeros(rows, c1 - c0)
        for (b0, b1), cross, ut_bb in zip(self.bounds, self.cross, self.upper, strict=True):
            lo, hi = max(b0, c0), min(b1, c1)
            if lo >= hi:
                continue
            above = min(rows, b0)
            out[:above, lo - c0 : hi - c0] = cross[:above] @ ut_bb[:, lo - b0 : hi - b0]
            if rows > b0:
                out[b0 : min(rows, b1), lo - c0 : hi - c0] = ut_bb[: min(rows, b1) - b0, lo - b0 : hi - b0]
        return out

    def lazy(self, err_t: torch.Tensor, w_t: torch.Tensor, b0: int, c0: int, c1: int) -> torch.Tensor:
        """Columns ``c0:c1`` (≥ b0) of the textbook's weights as updated by the columns before
        ``b0`` only, transposed: ``(W + (E_P Ũ_P,S) Ũ_SS⁻¹)ᵀ`` over ``S = b0:c1``, ``E_Pᵀ = err_t``."""
        if b0 == 0:
            return w_t[c0:c1].clone()
        tail = self.factor(b0, b0, c1).T @ err_t
        diagonal = self.factor(c1, b0, c1)[b0:]
        tail = torch.linalg.solve_triangular(diagonal.T, tail, upper=False)
        return tail[c0 - b0 :].add_(w_t[c0:c1])


def solve_gptq(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    spec: GridSpec,
    *,
    damping: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    fixed_grid: Grid | None = None,
) -> QuantResult:
    """GPTQ on ``spec``'s grid; ``fixed_grid`` forces a given grid (used to start CD from GPTQ).

    A fixed grid with an offset (GGUF types with a minimum) runs on ``W − offset`` with its
    offset-free grid; the codes are then dequantized on the grid itself (exact values)."""
    began = time.perf_counter()
    if fixed_grid is not None and fixed_grid.offset is not None:
        shifted = solve_gptq(
            weight - fixed_grid.expand_offset(weight.shape[1]),
            sigma,
            spec,
            damping=damping,
            block_size=block_size,
            act_order=act_order,
            fixed_grid=fixed_grid.without_offset(),
        )
        approx = fixed_grid.dequantize(shifted.codes)
        value = shifted.objective
        return QuantResult(
            "gptq", approx, shifted.codes, fixed_grid, value, value, seconds=time.perf_counter() - began,
            row_objective=shifted.row_objective,
        )  # fmt: skip
    rows, columns = weight.shape
    n_groups = spec.n_groups(columns)
    static = fixed_grid is not None or act_order or spec.per_layer or spec.group_size is None
    perm = torch.argsort(sigma.diagonal(), descending=True, stable=True) if act_order else None
    name = resolve(weight)
    kernel = backend_module(name)
    block_size = min(block_size, getattr(kernel, "MAX_BLOCK", block_size))

    def factor() -> tuple[_Blocks, torch.Tensor]:
        lower, extra = _cholesky(sigma, damping, perm)
        return _Blocks.of(lower, block_size, name), extra  # half of the factor's storage

    # once per layer however many bands of its rows are solved (solvers.bands)
    blocks, extra = once(sigma, ("gptq", damping, act_order, block_size, name), factor)
    visited = perm if perm is not None else torch.arange(columns, device=weight.device)
    run = _Pass(
        kernel,
        weight,
        spec,
        blocks,
        perm,
        torch.div(visited, columns // n_groups, rounding_mode="floor"),  # the group of each column
        None if static else spec.group_size,
        fixed_grid if fixed_grid is not None or not spec.per_layer else fit_minmax(weight, spec),
    )
    parts = parallel(name, [partial(run.rows, lo, hi, extra) for lo, hi in row_spans(name, rows, columns)])
    row_values = torch.cat(parts)
    value = float(row_values.sum())
    grid = fixed_grid if fixed_grid is not None else Grid(spec, run.scale, run.zero)
    return QuantResult(
        "gptq", run.approx, run.codes, grid, value, value, seconds=time.perf_counter() - began,
        row_objective=row_values,
    )  # fmt: skip


class _Pass:
    """One GPTQ pass, run rows by rows (:meth:`rows`, one call per thread) into shared outputs:
    ``approx``, ``codes`` and the grid's ``scale, zero``."""

    def __init__(self, kernel, weight, spec, blocks, perm, gidx, group_size, layer_grid):
        self.kernel, self.weight, self.spec, self.blocks, self.perm = kernel, weight, spec, blocks, perm
        self.gidx, self.group_size, self.layer_grid = gidx, group_size, layer_grid
        self.inverse = None if perm is None else torch.argsort(perm)
        rows, columns = weight.shape
        groups = spec.n_groups(columns)
        self.approx = torch.empty_like(weight)
        self.codes = torch.empty(rows, columns, dtype=torch.uint8, device=weight.device)
        self.scale = weight.new_empty(rows, groups)
        self.zero = weight.new_empty(rows, groups)

    def rows(self, lo: int, hi: int, extra: torch.Tensor) -> torch.Tensor:
        """The whole pass for rows lo..hi (grid fit, column loop, codes); returns each row's
        objective ``tr(E Σ Eᵀ)`` (float64): its ``‖e‖²`` less the damping term ``Σ_j extra_j E_j²``
        (``extra`` = diag(H − Σ) in the visited order)."""
        spec, blocks, group_size = self.spec, self.blocks, self.group_size
        w = self.weight[lo:hi]
        fixed = self.layer_grid
        grid = fit_minmax(w, spec) if fixed is None else Grid(spec, fixed.scale[lo:hi], fixed.zero[lo:hi])
        # Transposed working copies, (columns, rows): "column j for every row" is a contiguous
        # vector. w_t holds W, and E = W − Q in the columns already finished.
        w_t = (
            w.T.clone(memory_format=torch.contiguous_format)
            if self.perm is None
            else w.T[self.perm].contiguous()
        )
        hat_t = torch.zeros_like(w_t)
        s_tab = grid.scale.T.clone(memory_format=torch.contiguous_format)  # (groups, rows)
        z_tab = grid.zero.T.clone(memory_format=torch.contiguous_format)  # dynamic groups: filled in
        scaled = torch.zeros(hi - lo, dtype=torch.float64, device=w.device)
        for (b0, b1), u_bb, u_diag, m_b in zip(
            blocks.bounds, blocks.inverse, blocks.diag, blocks.cross, strict=True
        ):
            x = w_t[b0:b1].clone() if b0 == 0 else torch.addmm(w_t[b0:b1], m_b.T, w_t[:b0])
            err_blk = torch.empty_like(x)
            # Dynamic groups: the kernel stops at each group's first column, whose grid is fitted
            # on the error-updated weights of the group's columns before it resumes (columns past
            # the block as updated by the blocks before this one, as the textbook's lazy updates
            # have them).
            cuts = [j for j in range(b0, b1) if group_size and j % group_size == 0]
            bounds = sorted({b0, *cuts, b1})
            for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
                if c0 in cuts:
                    end = min(c0 + group_size, w_t.shape[0])
                    span = x[c0 - b0 : end - b0]
                    if end > b1:
                        span = torch.cat([span, blocks.lazy(w_t[:b0], w_t, b0, b1, end)])
                    s, z = _minmax_params(span.amin(dim=0), span.amax(dim=0), spec)
                    s_tab[c0 // group_size], z_tab[c0 // group_size] = s, z
                self.kernel.block(
                    Block(
                        GPTQ,
                        x,
                        err_blk,
                        hat_t,
                        b0,
                        s_tab,
                        z_tab,
                        self.gidx[b0:b1],
                        u_bb,
                        u_diag,
                        spec.maxq,
                        start=c0 - b0,
                        stop=c1 - b0,
                    )
                )
            scaled += err_blk.square().sum(dim=0, dtype=torch.float64)
            w_t[b0:b1] -= hat_t[b0:b1]  # these columns are finished: E = W − Q
        if group_size:
            grid = Grid(spec, s_tab.T, z_tab.T)
        approx = (hat_t if self.inverse is None else hat_t[self.inverse]).T
        self.codes[lo:hi] = codes = grid.quantize(approx)
        self.approx[lo:hi] = grid.dequantize(codes)  # the same values: Q is on the grid already
        self.scale[lo:hi], self.zero[lo:hi] = grid.scale, grid.zero
        # tr(E H Eᵀ) = ‖e‖², less the damping term: tr(E Σ Eᵀ), row by row
        # (in place: w_t is not needed again)
        return scaled - w_t.square_().mul_(extra.to(w_t.dtype).unsqueeze(1)).sum(dim=0, dtype=torch.float64)
