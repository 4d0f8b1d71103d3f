"""The in-block kernel compiled for the CPU with numba (a wheel: no compiler on the user's machine).

Same rules and layout as :mod:`cdq_cli.kernels.reference` (read its docstring for the math). Two
entry points:

* :func:`block`: one block of B columns for every row, shared column order (CD and GPTQ). Rows
  are cut into tiles (one task each when threads are used); inside a tile the block's column loop
  runs sequentially with every step vectorised over the tile's rows, which are contiguous in the
  transposed layout. As in the torch reference, rank-1 updates stay inside sub-blocks of
  ``_SUB`` columns and each sub-block's change reaches the rest of the block at once (eight
  columns per pass over a row of ``x``, so that row is loaded and stored once per eight updates).
* :func:`row_sweep`: one whole CD sweep for rows that each visit the columns in their own order
  (COMQ's greedy order), in natural coordinates (no gathered Σ): visit ``j = perm[i, k]``, and
  when the entry changes by δ, ``G[i, :] += δ · Σ[j, :]``; an entry that does not change costs
  no update.

Compilation: on first use for each dtype, cached on disk (``cache=True``), so only the first run
on a machine pays it. ``error_model="numpy"`` (IEEE division, no zero checks) is what lets LLVM
vectorise the loops; ``fastmath`` is limited to contracting multiply-adds (and reassociating the
float64 gain sum), so rounding decisions use exactly torch's ``round(v / s)``.

Threads: torch's thread count (one knob for the GEMMs and the kernels), at most
``NUMBA_NUM_THREADS``, and fewer for calls too small to repay starting the pool.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .reference import CD

_SUB = 8  # columns per sub-block (see the module docstring)
_TILE = 512  # rows per tile: a tile's (B, _TILE) block of x stays in L2
_ENTRIES_PER_THREAD = 1 << 16  # entries a call visits per thread, at least
_EXACT = {"error_model": "numpy", "cache": True}
_FMA = {"error_model": "numpy", "cache": True, "fastmath": {"contract"}}


@numba.njit(inline="always", **_EXACT)
def _round(v, s, z, maxq):
    """s · (clamp(rint(v / s) + z, 0, maxq) − z), branch-free."""
    c = min(max(np.rint(v / s) + z, z - z), maxq)
    return (c - z) * s


@numba.njit(**_EXACT)
def _visit_cd(out_j, hat_c, x_j, s, z, inv, maxq, relax, lo, hi):
    """out_j = hat_c − new and hat_c = new for rows lo..hi (new = round(hat + x·inv), or the target)."""
    for t in range(np.uint64(lo), np.uint64(hi)):
        target = hat_c[t] + x_j[t] * inv
        out_j[t] = target if relax else _round(target, s[t], z[t], maxq)
    for t in range(np.uint64(lo), np.uint64(hi)):
        new = out_j[t]
        out_j[t] = hat_c[t] - new
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


@numba.njit(error_model="numpy", cache=True, fastmath={"contract", "reassoc"})
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
def _block_tile(
    x,
    hat,
    err,
    col0,
    scale,
    zero,
    gidx,
    coef,
    coef_t,
    diag,
    sdiag,
    dead,
    out,
    maxq,
    relax,
    rule,
    start,
    stop,
    lo,
    hi,
):
    """Rows lo..hi of one block; ``coef[j, k]`` (k > j, else 0) is the signed update coefficient
    and ``coef_t`` its transpose. Returns (objective change, entries changed) for CD."""
    width = x.shape[0]
    gain = 0.0
    changed = 0
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
    if rule == CD and err.shape[0] > 0:
        for j in range(start, stop):
            _add(err[col0 + j], out[j], lo, hi)
    return gain, changed


@numba.njit(**_EXACT)
def _coefficients(mat, rule):
    width = mat.shape[0]
    coef = np.zeros_like(mat)
    sign = 1 if rule == CD else -1
    for j in range(width):
        for k in range(j + 1, width):
            coef[j, k] = sign * mat[j, k]
    return coef, coef.T.copy()


@numba.njit(**_EXACT)
def _block_serial(
    x,
    hat,
    err,
    col0,
    scale,
    zero,
    gidx,
    mat,
    diag,
    sdiag,
    dead,
    out,
    maxq,
    relax,
    rule,
    start,
    stop,
    tile,
    gains,
    counts,
):
    coef, coef_t = _coefficients(mat, rule)
    rows = x.shape[1]
    for t in range((rows + tile - 1) // tile):
        lo = t * tile
        gains[t], counts[t] = _block_tile(
            x,
            hat,
            err,
            col0,
            scale,
            zero,
            gidx,
            coef,
            coef_t,
            diag,
            sdiag,
            dead,
            out,
            maxq,
            relax,
            rule,
            start,
            stop,
            lo,
            min(lo + tile, rows),
        )


@numba.njit(parallel=True, **_EXACT)
def _block_parallel(
    x,
    hat,
    err,
    col0,
    scale,
    zero,
    gidx,
    mat,
    diag,
    sdiag,
    dead,
    out,
    maxq,
    relax,
    rule,
    start,
    stop,
    tile,
    gains,
    counts,
):
    coef, coef_t = _coefficients(mat, rule)
    rows = x.shape[1]
    for t in numba.prange((rows + tile - 1) // tile):
        lo = t * tile
        gains[t], counts[t] = _block_tile(
            x,
            hat,
            err,
            col0,
            scale,
            zero,
            gidx,
            coef,
            coef_t,
            diag,
            sdiag,
            dead,
            out,
            maxq,
            relax,
            rule,
            start,
            stop,
            lo,
            min(lo + tile, rows),
        )


@numba.njit(**_EXACT)
def _row(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, i):
    """Sweep row ``i`` in its order; return (objective change, entries changed)."""
    columns = g.shape[1]
    gi = g[i]
    hi = hat[i]
    gain = 0.0
    changed = 0
    for k in range(columns):
        j = perm[i, k]
        s = scale[i, j // gsize]
        z = zero[i, j // gsize]
        if diag[j] <= 0:
            hi[j] = _round(w[i, j], s, z, maxq)
            continue
        old = hi[j]
        gij = gi[j]
        target = old + gij * inv_d[j]
        new = target if relax else _round(target, s, z, maxq)
        delta = old - new
        hi[j] = new
        if delta != 0:
            changed += 1
            gain += delta * (2.0 * gij + delta * diag[j])
            _axpy(gi, delta, sigma[j], 0, columns)
    return gain, changed


@numba.njit(**_EXACT)
def _rows_serial(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, gains, changed):
    for i in range(g.shape[0]):
        gains[i], changed[i] = _row(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, i)


@numba.njit(parallel=True, **_EXACT)
def _rows_parallel(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, gains, changed):
    for i in numba.prange(g.shape[0]):
        gains[i], changed[i] = _row(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, i)


def _threads(entries: int) -> int:
    """Threads for a call visiting ``entries`` entries (see the module docstring)."""
    wanted = max(
        1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, entries // _ENTRIES_PER_THREAD)
    )
    if wanted > 1 and numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted


def _arrays(*tensors):
    """numpy views (no copies) of C-contiguous CPU tensors: one compiled variant per dtype."""
    out = []
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the numba kernel takes contiguous tensors")
        out.append(t.numpy())
    return out


def block(
    x,
    hat,
    col0,
    scale,
    zero,
    gidx,
    mat,
    diag,
    dead,
    out,
    *,
    maxq,
    relax=False,
    rule=CD,
    start=0,
    stop=None,
    err=None,
    sdiag=None,
):
    """Numba version of :func:`cdq_cli.kernels.reference.block` (same arguments, CPU tensors)."""
    width, rows = x.shape
    stop = width if stop is None else stop
    if start >= stop:
        return (
            (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)) if rule == CD else None
        )
    dead = torch.zeros(width, dtype=torch.bool) if dead is None else dead
    sdiag = diag if sdiag is None else sdiag
    err = x.new_empty(0, 0) if err is None else err
    threads = _threads(rows * (stop - start))
    tiles = max(-(-rows // _TILE), 2 * threads if threads > 1 else 1)
    tile = -(-rows // tiles)
    tiles = -(-rows // tile)
    gains = np.zeros(tiles, dtype=np.float64)
    counts = np.zeros(tiles, dtype=np.int64)
    x_np, hat_np, err_np, *rest = _arrays(x, hat, err, scale, zero, gidx, mat, diag, sdiag, dead, out)
    run = _block_serial if threads == 1 else _block_parallel
    maxq = x_np.dtype.type(maxq)
    run(
        x_np,
        hat_np,
        err_np,
        int(col0),
        *rest,
        maxq,
        bool(relax),
        int(rule),
        int(start),
        int(stop),
        tile,
        gains,
        counts,
    )
    if rule != CD:
        return None
    return torch.tensor(gains.sum(), dtype=torch.float64), torch.tensor(int(counts.sum()))


def row_sweep(g, hat, w, scale, zero, group_size, sigma, diag, inv_d, perm, *, maxq, relax=False):
    """One CD sweep of every row in its own order ``perm`` (rows, columns), natural coordinates.

    ``g`` (= E Σ) and ``hat`` (rows, columns) are updated in place; ``scale, zero`` are the grid's
    (rows, groups); returns the objective change (float64) and entries changed, per row.
    """
    rows, columns = g.shape
    run = _rows_parallel if _threads(rows * columns) > 1 else _rows_serial
    g_np, hat_np, w_np, s_np, z_np, sigma_np, diag_np, inv_np, perm_np = _arrays(
        g, hat, w, scale, zero, sigma, diag, inv_d, perm
    )
    gains = np.zeros(rows, dtype=np.float64)
    changed = np.zeros(rows, dtype=np.int64)
    maxq = g_np.dtype.type(maxq)
    run(
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
    )
    return torch.from_numpy(gains), torch.from_numpy(changed)
