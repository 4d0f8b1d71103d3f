"""The in-block kernel compiled for the CPU with numba (a wheel: no compiler on the user's machine).

Same rules and layout as :mod:`cdq_cli.kernels.reference` (read its docstring for the math). Two
entry points:

* :func:`block`: one block of B columns for every row, shared column order (CD and GPTQ). A row
  never reads another row, so each row runs the block's sequential column loop on its own; the
  rank-1 update of a changed entry is a contiguous ``x[i, j+1:] ± c · mat[j, j+1:]`` (vectorised),
  and an entry that does not change costs no update. Row tiles are spread over threads.
* :func:`row_sweep`: one whole CD sweep for rows that each visit the columns in their own order
  (COMQ's greedy order), in natural coordinates (no gathered Σ): visit ``j = perm[i, k]``, and
  when the entry changes by δ, ``G[i, :] += δ · Σ[j, :]``.

Functions are compiled on first use for each dtype and cached on disk (``cache=True``), so only
the first run on a machine pays the compile time. Threads: torch's thread count (one knob for
the GEMMs and the kernels), at most ``NUMBA_NUM_THREADS``, and one thread for calls too small to
repay starting the pool.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .reference import CD

# Below this many multiply-adds per thread a call runs on one thread.
_WORK_PER_THREAD = 1 << 22


@numba.njit(cache=True, inline="always")
def _round(v, s, z, maxq):
    """s · (clamp(rint(v / s) + z, 0, maxq) − z), branch-free."""
    c = min(max(np.rint(v / s) + z, z - z), maxq)
    return (c - z) * s


@numba.njit(cache=True)
def _block_range(
    x, hat, w, col0, scale, zero, gidx, mat, diag, dead, out, maxq, relax, rule, start, stop, r0, r1
):
    width = x.shape[1]
    for i in range(r0, r1):
        xi = x[i]
        hi = hat[i]
        oi = out[i]
        si = scale[i]
        zi = zero[i]
        for j in range(start, stop):
            s = si[gidx[j]]
            z = zi[gidx[j]]
            c = col0 + j
            if rule == CD:
                if dead[j]:
                    hi[c] = _round(w[i, c], s, z, maxq)
                    oi[j] = 0
                    continue
                old = hi[c]
                target = old + xi[j] * diag[j]
                new = target if relax else _round(target, s, z, maxq)
                delta = old - new
                hi[c] = new
                oi[j] = delta
            else:
                v = xi[j]
                q = _round(v, s, z, maxq)
                hi[c] = q
                delta = (v - q) / diag[j]
                oi[j] = delta
                delta = -delta
            if delta != 0 and j + 1 < width:
                # Slices from index 0 let LLVM vectorise (no wrap-around check on the index).
                xs = xi[j + 1 :]
                ms = mat[j, j + 1 :]
                for k in range(xs.shape[0]):
                    xs[k] += delta * ms[k]


@numba.njit(cache=True)
def _block_serial(
    x, hat, w, col0, scale, zero, gidx, mat, diag, dead, out, maxq, relax, rule, start, stop, tile
):
    _block_range(
        x,
        hat,
        w,
        col0,
        scale,
        zero,
        gidx,
        mat,
        diag,
        dead,
        out,
        maxq,
        relax,
        rule,
        start,
        stop,
        0,
        x.shape[0],
    )


@numba.njit(cache=True, parallel=True)
def _block_parallel(
    x, hat, w, col0, scale, zero, gidx, mat, diag, dead, out, maxq, relax, rule, start, stop, tile
):
    rows = x.shape[0]
    for t in numba.prange((rows + tile - 1) // tile):
        r0 = t * tile
        r1 = min(r0 + tile, rows)
        _block_range(
            x, hat, w, col0, scale, zero, gidx, mat, diag, dead, out, maxq, relax, rule, start, stop, r0, r1
        )


@numba.njit(cache=True)
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
            sj = sigma[j]
            for m in range(columns):
                gi[m] += delta * sj[m]
    return gain, changed


@numba.njit(cache=True)
def _rows_serial(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, gains, changed):
    for i in range(g.shape[0]):
        gains[i], changed[i] = _row(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, i)


@numba.njit(cache=True, parallel=True)
def _rows_parallel(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, gains, changed):
    for i in numba.prange(g.shape[0]):
        gains[i], changed[i] = _row(g, hat, w, scale, zero, gsize, sigma, diag, inv_d, perm, maxq, relax, i)


def _threads(work: int) -> int:
    """Threads for a call of ``work`` multiply-adds (see the module docstring)."""
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, work // _WORK_PER_THREAD))
    if wanted > 1 and numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted


def _arrays(*tensors):
    """numpy views (no copies) of C-contiguous CPU tensors; one compiled variant per dtype."""
    out = []
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the numba kernel takes contiguous tensors")
        out.append(t.numpy())
    return out


def block(
    x,
    hat,
    w,
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
):
    """Numba version of :func:`cdq_cli.kernels.reference.block` (same arguments, CPU tensors)."""
    rows, width = x.shape
    stop = width if stop is None else stop
    if start >= stop:
        return
    if dead is None:
        dead = torch.zeros(width, dtype=torch.bool)
    threads = _threads(rows * width * (stop - start) // 2)
    arrays = _arrays(x, hat, w, scale, zero, gidx, mat, diag, dead, out)
    run = _block_serial if threads == 1 else _block_parallel
    tile = -(-rows // (4 * threads))  # a few tiles per thread to even out rows that change more
    maxq = arrays[0].dtype.type(maxq)
    run(*arrays[:3], int(col0), *arrays[3:], maxq, bool(relax), int(rule), int(start), int(stop), tile)


def row_sweep(g, hat, w, scale, zero, group_size, sigma, diag, inv_d, perm, *, maxq, relax=False):
    """One CD sweep of every row in its own order ``perm`` (rows, columns), natural coordinates.

    ``g`` (= E Σ) and ``hat`` (rows, columns) are updated in place; ``scale, zero`` are the grid's
    (rows, groups); returns the objective change (float64) and entries changed, per row.
    """
    rows, columns = g.shape
    run = _rows_parallel if _threads(rows * columns * columns // 8) > 1 else _rows_serial
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
