"""The in-block kernel compiled for the CPU with numba (a wheel: no compiler on the user's machine).

Same rules and layout as :mod:`cdq_cli.kernels.reference` (read its docstring for the math). Two
entry points, each one compiled body run on the calling thread with the GIL released, so that the
solvers run one per thread on their own rows (:mod:`cdq_cli.kernels.threads`):

* :func:`block`: one block of B columns for every row, shared column order (CD and GPTQ). Rows
  are cut into tiles whose (B, tile) piece of ``x`` stays in the L2 cache; inside a tile the
  block's column loop runs sequentially with every step vectorised over the tile's rows, which
  are contiguous in the transposed layout. As in the torch reference, rank-1 updates stay inside
  sub-blocks of ``_SUB`` columns and each sub-block's change reaches the rest of the block at once
  (eight columns per pass over a row of ``x``, so that row is loaded and stored once per eight
  updates).
* :func:`row_sweep`: one whole CD sweep for rows that each visit the columns in their own order
  (COMQ's greedy order), in natural coordinates (no gathered Σ): visit ``j = perm[i, k]``, and
  when the entry changes by δ, ``G[i, :] += δ · Σ[j, :]``; an entry that does not change costs
  no update. Its rows are split over threads here.

Compilation: on first use for each dtype, cached on disk (``cache=True``), so only the first run
on a machine pays it. ``error_model="numpy"`` (IEEE division, no zero checks) is what lets LLVM
vectorise the loops; ``fastmath`` is limited to contracting multiply-adds (and reassociating the
float64 gain sum), so rounding decisions use exactly torch's ``round(v / s)``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from . import threads
from .reference import CD, Block

_SUB = 8  # columns per sub-block (see the module docstring)
_TILE_BYTES = 256 << 10  # a tile's (B, tile) piece of x: a quarter of a 1 MB L2
_EXACT = {"error_model": "numpy", "cache": True, "nogil": True}
_FMA = {"error_model": "numpy", "cache": True, "nogil": True, "fastmath": {"contract"}}


@numba.njit(inline="always", **_EXACT)
def _round(v, s, z, maxq):
    """s · (clamp(rint(v / s) + z, 0, maxq) − z), branch-free."""
    c = min(max(np.rint(v / s) + z, z - z), maxq)
    return (c - z) * s


@numba.njit(**_EXACT)
def _visit_cd(out_j, hat_c, x_j, s, z, inv, maxq, relax, lo, hi):
    """new = round(hat + x·inv) (or the target itself), out_j = hat_c − new, hat_c = new."""
    if relax:
        for t in range(np.uint64(lo), np.uint64(hi)):
            old = hat_c[t]
            new = old + x_j[t] * inv
            out_j[t] = old - new
            hat_c[t] = new
    else:
        for t in range(np.uint64(lo), np.uint64(hi)):
            old = hat_c[t]
            new = _round(old + x_j[t] * inv, s[t], z[t], maxq)
            out_j[t] = old - new
            hat_c[t] = new


@numba.njit(**_EXACT)
def _zero(out_j, lo, hi):
    for t in range(np.uint64(lo), np.uint64(hi)):
        out_j[t] = 0


@numba.njit(**_EXACT)
def _visit_gptq(out_j, hat_c, x_j, s, z, d, maxq, lo, hi):
    for t in range(np.uint64(lo), np.uint64(hi)):
        v = x_j[t]
        q = _round(v, s[t], z[t], maxq)
        hat_c[t] = q
        out_j[t] = (v - q) / d


@numba.njit(**_FMA)
def _axpy(x_k, c, out_j, lo, hi):
    for t in range(np.uint64(lo), np.uint64(hi)):
        x_k[t] += c * out_j[t]


@numba.njit(**_FMA)
def _axpy8(x_k, c, out, j, lo, hi):
    """x_k += Σ_{m<8} c[j+m] · out[j+m]: one load and store of x_k for eight updates."""
    c0, c1, c2, c3, c4, c5, c6, c7 = (
        c[j],
        c[j + 1],
        c[j + 2],
        c[j + 3],
        c[j + 4],
        c[j + 5],
        c[j + 6],
        c[j + 7],
    )
    o0, o1, o2, o3, o4, o5, o6, o7 = (
        out[j],
        out[j + 1],
        out[j + 2],
        out[j + 3],
        out[j + 4],
        out[j + 5],
        out[j + 6],
        out[j + 7],
    )
    for t in range(np.uint64(lo), np.uint64(hi)):
        x_k[t] += (c0 * o0[t] + c1 * o1[t] + c2 * o2[t] + c3 * o3[t]) + (
            c4 * o4[t] + c5 * o5[t] + c6 * o6[t] + c7 * o7[t]
        )


@numba.njit(error_model="numpy", cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _gain(out_j, x_j, sd, lo, hi):
    """Σ out·(2x + out·Σ_jj) in float64, and the count of nonzero entries."""
    total = 0.0
    count = 0
    for t in range(np.uint64(lo), np.uint64(hi)):
        d = np.float64(out_j[t])
        total += d * (2.0 * np.float64(x_j[t]) + d * sd)
        count += out_j[t] != 0
    return total, count


@numba.njit(**_EXACT)
def _add(err_c, out_j, lo, hi):
    for t in range(np.uint64(lo), np.uint64(hi)):
        err_c[t] += out_j[t]


@numba.njit(**_EXACT)
def _coefficients(mat, rule):
    """``coef[j, k]`` (k > j, else 0): the signed update coefficient, and its transpose."""
    width = mat.shape[0]
    coef = np.zeros_like(mat)
    sign = 1 if rule == CD else -1
    for j in range(width):
        for k in range(j + 1, width):
            coef[j, k] = sign * mat[j, k]
    return coef, coef.T.copy()


@numba.njit(**_EXACT)
def _block(
    x, hat, err, col0, scale, zero, gidx, mat, diag, sdiag, dead, out, maxq, relax, rule, start, stop, tile
):
    """The reference's rules for one block, every row, tile by tile; returns (objective change,
    entries changed) for CD. ``err`` with no rows means none."""
    coef, coef_t = _coefficients(mat, rule)
    width, rows = x.shape
    gain = 0.0
    changed = 0
    for lo in range(0, rows, tile):
        hi = min(lo + tile, rows)
        for s0 in range(start, stop, _SUB):
            s1 = min(s0 + _SUB, stop)
            for j in range(s0, s1):
                c = col0 + j
                g = gidx[j]
                if rule == CD:
                    if dead[j]:
                        _zero(out[j], lo, hi)
                        continue
                    _visit_cd(out[j], hat[c], x[j], scale[g], zero[g], diag[j], maxq, relax, lo, hi)
                    part, count = _gain(out[j], x[j], sdiag[j], lo, hi)
                    gain += part
                    changed += count
                    if err.shape[0] > 0:
                        _add(err[c], out[j], lo, hi)
                else:
                    _visit_gptq(out[j], hat[c], x[j], scale[g], zero[g], diag[j], maxq, lo, hi)
                for k in range(j + 1, s1):
                    _axpy(x[k], coef[j, k], out[j], lo, hi)
            if s1 < width:  # the sub-block's change reaches the rest of the block
                for k in range(s1, width):
                    x_k = x[k]
                    j = s0
                    while j + 8 <= s1:
                        _axpy8(x_k, coef_t[k], out, j, lo, hi)
                        j += 8
                    while j < s1:
                        _axpy(x_k, coef[j, k], out[j], lo, hi)
                        j += 1
    return gain, changed


@numba.njit(**_EXACT)
def _rows(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, gains, changed, lo, hi):
    """Sweep rows lo..hi, each in its order; per row: (objective change, entries changed)."""
    columns = g.shape[1]
    for i in range(lo, hi):
        gi = g[i]
        hi_row = hat[i]
        gain = 0.0
        count = 0
        for k in range(columns):
            j = perm[i, k]
            s = scale[i, j // gsize]
            z = zero[i, j // gsize]
            if diag[j] <= 0:
                hi_row[j] = _round(w[i, j], s, z, maxq)
                continue
            old = hi_row[j]
            gij = gi[j]
            target = old + gij * inv_d[j]
            new = target if relax else _round(target, s, z, maxq)
            delta = old - new
            hi_row[j] = new
            if delta != 0:
                count += 1
                gain += delta * (2.0 * gij + delta * diag[j])
                _axpy(gi, delta, sigma[j], 0, columns)
        gains[i] = gain
        changed[i] = count


def _arrays(*tensors):
    """numpy views (no copies) of C-contiguous CPU tensors: one compiled variant per dtype."""
    out = []
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the numba kernel takes contiguous tensors")
        out.append(t.numpy())
    return out


def block(b: Block) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Numba version of :func:`cdq_cli.kernels.reference.block` (shared orders, CPU tensors), on
    the calling thread."""
    if b.per_row:
        raise ValueError("the numba kernel sweeps per-row orders with row_sweep, not block")
    width, rows = b.x.shape
    start, stop = b.span
    if start >= stop:
        return (
            None
            if b.rule != CD
            else (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64))
        )
    dead = torch.zeros(width, dtype=torch.bool) if b.dead is None else b.dead
    sdiag = b.diag if b.sdiag is None else b.sdiag
    err = b.x.new_empty(0, 0) if b.err is None else b.err
    x, hat, err, *rest = _arrays(b.x, b.hat, err, b.scale, b.zero, b.gidx, b.mat, b.diag, sdiag, dead, b.out)
    scale, zero, gidx, mat, diag, sdiag, dead, out = rest
    tile = max(16, _TILE_BYTES // (width * x.itemsize) // 16 * 16)
    gain, changed = _block(
        x,
        hat,
        err,
        int(b.col0),
        scale,
        zero,
        gidx,
        mat,
        diag,
        sdiag,
        dead,
        out,
        x.dtype.type(b.maxq),
        bool(b.relax),
        int(b.rule),
        int(start),
        int(stop),
        tile,
    )
    if b.rule != CD:
        return None
    return torch.tensor(gain, dtype=torch.float64), torch.tensor(changed)


def row_sweep(g, hat, w, scale, zero, group_size, sigma, diag, inv_d, perm, *, maxq, relax=False):
    """One CD sweep of every row in its own order ``perm`` (rows, columns), natural coordinates.

    ``g`` (= E Σ) and ``hat`` (rows, columns) are updated in place; ``scale, zero`` are the grid's
    (rows, groups); returns the objective change (float64) and entries changed, per row. Rows are
    split over torch's thread count (:mod:`cdq_cli.kernels.threads`).
    """
    rows, columns = g.shape
    arrays = _arrays(g, hat, w, scale, zero, sigma, diag, inv_d, perm)
    g_np, hat_np, w_np, s_np, z_np, sigma_np, diag_np, inv_np, perm_np = arrays
    gains = np.zeros(rows, dtype=np.float64)
    changed = np.zeros(rows, dtype=np.int64)
    maxq = g_np.dtype.type(maxq)

    def span(lo, hi):
        return lambda: _rows(
            g_np,
            hat_np,
            w_np,
            s_np,
            z_np,
            int(group_size),
            sigma_np,
            diag_np,
            inv_np,
            perm_np,
            maxq,
            bool(relax),
            gains,
            changed,
            lo,
            hi,
        )

    threads.run([span(lo, hi) for lo, hi in threads.spans(rows, columns)])
    return torch.from_numpy(gains), torch.from_numpy(changed)
