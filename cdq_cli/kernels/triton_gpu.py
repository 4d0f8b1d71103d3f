"""The in-block kernel in Triton, for CUDA tensors (and, for tests, Triton's CPU interpreter).

Same rules and layout as :mod:`cdq_cli.kernels.reference` (read its docstring for the math). One
program owns a tile of ``BLOCK_R`` rows and keeps the tile's whole block of ``x`` (≤ 128 × BLOCK_R)
in registers for the sequential column loop; one launch per block instead of ~10 per column.
Every operand is passed with its strides, so the same kernel serves the shared order (``mat``
(B, B), ``diag`` (B,) broadcast over rows with stride 0) and per-row orders (``mat`` (R, B, B),
``diag`` (B, R)), CD and GPTQ.

Rounding is done with ``floor`` (half to even, as ``torch.round``) and IEEE division
(``div_rn`` in float32; float64 division is IEEE already), so results equal torch's bit for bit
where the inputs do — ties included.

The jitted kernel is built on first use, in the mode ``TRITON_INTERPRET`` asks for at that time,
so tests can run it on CPU tensors by setting ``TRITON_INTERPRET=1`` (no GPU needed).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import CD, Block

BLOCK_R = 32
# ``tl.sum``'s combine function, passed to the builtin ``tl.reduce`` directly: ``tl.sum`` itself is
# a jitted function fixed at import in one mode, while ``tl.reduce`` with this combine function
# works in both the compiled and the interpreted kernel whichever mode triton was imported in.
_SUM = tl.standard._sum_combine
MAX_BLOCK = 128  # columns per block: the tile of x lives in registers


def _kernel_source(
    x_ptr,
    hat_ptr,
    w_ptr,
    out_ptr,
    s_ptr,
    z_ptr,
    gidx_ptr,
    mat_ptr,
    diag_ptr,
    dead_ptr,
    err_ptr,
    sdiag_ptr,
    gain_ptr,
    count_ptr,
    rows,
    width,
    col0,
    start,
    stop,
    maxq,
    sx_i,
    sx_j,
    sh_i,
    sh_j,
    sw_i,
    sw_j,
    so_i,
    so_j,
    ss_i,
    ss_g,
    sz_i,
    sz_g,
    sg_i,
    sg_j,
    sm_i,
    sm_j,
    sm_k,
    sd_i,
    sd_j,
    se_i,
    se_j,
    sr_i,
    sr_j,
    sq_i,
    sq_j,
    RELAX: tl.constexpr,
    RULE: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_ERR: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    k = tl.arange(0, BLOCK_B)
    kmask = k < width
    tile_mask = rmask[:, None] & kmask[None, :]
    xt = tl.load(x_ptr + r[:, None] * sx_i + k[None, :] * sx_j, mask=tile_mask, other=0.0)
    gain = tl.full([BLOCK_R], 0.0, tl.float64)  # CD: objective change and count, this tile
    count = tl.full([BLOCK_R], 0, tl.int64)
    for j in range(start, stop):
        xj = tl.reduce(tl.where(k[None, :] == j, xt, 0.0), 1, _SUM)  # column j of the tile, exactly
        gid = tl.load(gidx_ptr + r * sg_i + j * sg_j, mask=rmask, other=0)
        s = tl.load(s_ptr + r * ss_i + gid * ss_g, mask=rmask, other=1.0)
        z = tl.load(z_ptr + r * sz_i + gid * sz_g, mask=rmask, other=0.0)
        d = tl.load(diag_ptr + r * sd_i + j * sd_j, mask=rmask, other=1.0)
        hat_at = hat_ptr + r * sh_i + (col0 + j) * sh_j
        if RULE == 0:
            old = tl.load(hat_at, mask=rmask, other=0.0)
            target = old + xj * d
            dead = tl.load(dead_ptr + r * se_i + j * se_j, mask=rmask, other=0) != 0
            if PER_ROW:  # a dead entry takes the rounding of W (the shared order skips dead columns)
                wv = tl.load(w_ptr + r * sw_i + (col0 + j) * sw_j, mask=rmask, other=0.0)
                source = tl.where(dead, wv, target)
            else:
                source = target
            if F64:  # float64 division is IEEE already; div_rn is the float32 one
                u = source / s
            else:
                u = tl.math.div_rn(source, s)
            f = tl.floor(u)
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0  # rint: half to even, from exact floors
            up = ((u - f) > 0.5) | (((u - f) == 0.5) & odd)
            rounded = (tl.minimum(tl.maximum(tl.where(up, f + 1.0, f) + z, 0.0), maxq) - z) * s
            if RELAX:
                new = target
            else:
                new = rounded
            if PER_ROW:
                new = tl.where(dead, rounded, new)
            else:
                new = tl.where(dead, old, new)
            delta = tl.where(dead, 0.0, old - new)
            coef = delta
            sd = tl.load(sdiag_ptr + r * sq_i + j * sq_j, mask=rmask, other=0.0).to(tl.float64)
            d64 = delta.to(tl.float64)
            gain += d64 * (2.0 * xj.to(tl.float64) + d64 * sd)
            count += (delta != 0.0).to(tl.int64)
            if HAS_ERR:
                err_at = err_ptr + r * sr_i + (col0 + j) * sr_j
                tl.store(err_at, tl.load(err_at, mask=rmask, other=0.0) + delta, mask=rmask)
        else:
            if F64:  # new = s · (clamp(rint(xj / s) + z, 0, maxq) − z)
                u = xj / s
            else:
                u = tl.math.div_rn(xj, s)
            f = tl.floor(u)
            odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
            up = ((u - f) > 0.5) | (((u - f) == 0.5) & odd)
            new = (tl.minimum(tl.maximum(tl.where(up, f + 1.0, f) + z, 0.0), maxq) - z) * s
            if F64:
                delta = (xj - new) / d
            else:
                delta = tl.math.div_rn(xj - new, d)
            coef = -delta
        tl.store(hat_at, new, mask=rmask)
        tl.store(out_ptr + r * so_i + j * so_j, delta, mask=rmask)
        later = (k > j) & kmask
        if PER_ROW:
            m = tl.load(
                mat_ptr + r[:, None] * sm_i + j * sm_j + k[None, :] * sm_k,
                mask=rmask[:, None] & later[None, :],
                other=0.0,
            )
        else:
            m = tl.load(mat_ptr + j * sm_j + k * sm_k, mask=later, other=0.0)[None, :]
        xt = tl.where(later[None, :], xt + coef[:, None] * m, xt)
    tl.store(x_ptr + r[:, None] * sx_i + k[None, :] * sx_j, xt, mask=tile_mask)
    if RULE == 0:
        tl.store(gain_ptr + pid, tl.reduce(gain, 0, _SUM))
        tl.store(count_ptr + pid, tl.reduce(count, 0, _SUM))


@functools.cache
def _build(interpret: bool):
    """The jitted kernel for this mode (compiled, or Triton's interpreter)."""
    return triton.jit(_kernel_source)


def _kernel():
    from triton import knobs

    return _build(bool(knobs.runtime.interpret))


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernel can run on ``tensor``'s device (CUDA, or CPU under the interpreter)."""
    from triton import knobs

    return tensor.is_cuda or bool(knobs.runtime.interpret)


def _launch(b: Block, w, gidx, diag, dead, sdiag, start, stop, per_row):
    """Every per-entry operand is indexed [j, i] (block column, row): ``x, out, gidx, diag, dead,
    sdiag`` (B, R), ``hat, w, err`` (p, R), ``scale, zero`` (groups, R); ``mat`` (B, B), or
    (R, B, B) per row. Returns the CD objective change and count of changed entries."""
    x, mat = b.x, b.mat
    if not usable(x):
        raise RuntimeError(
            "the Triton kernel needs CUDA tensors; set TRITON_INTERPRET=1 to run it on the CPU (tests)"
        )
    width, rows = x.shape
    if width > MAX_BLOCK:
        raise ValueError(f"the Triton in-block kernel takes at most {MAX_BLOCK} columns, got {width}")
    mat_strides = (mat.stride(0), mat.stride(1), mat.stride(2)) if per_row else (0, *mat.stride())
    err = b.err if b.rule == CD and b.err is not None else None

    def ij(t):  # strides in the kernel's (row, column) order
        return t.stride(1), t.stride(0)

    programs = triton.cdiv(rows, BLOCK_R)
    gains = torch.zeros(programs, dtype=torch.float64, device=x.device)
    counts = torch.zeros(programs, dtype=torch.int64, device=x.device)
    _kernel()[(programs,)](
        x,
        b.hat,
        w,
        b.out,
        b.scale,
        b.zero,
        gidx,
        mat,
        diag,
        dead,
        b.hat if err is None else err,
        sdiag,
        gains,
        counts,
        rows,
        width,
        b.col0,
        start,
        stop,
        float(b.maxq),
        *ij(x),
        *ij(b.hat),
        *ij(w),
        *ij(b.out),
        *ij(b.scale),
        *ij(b.zero),
        *ij(gidx),
        *mat_strides,
        *ij(diag),
        *ij(dead),
        *ij(b.hat if err is None else err),
        *ij(sdiag),
        RELAX=bool(b.relax),
        RULE=int(b.rule),
        PER_ROW=per_row,
        HAS_ERR=err is not None,
        F64=x.dtype == torch.float64,
        BLOCK_R=BLOCK_R,
        BLOCK_B=max(16, triton.next_power_of_2(width)),
    )
    return gains.sum(), counts.sum()


def block(b: Block) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Triton version of :func:`cdq_cli.kernels.reference.block` (shared and per-row orders)."""
    if b.per_row:
        return _launch(b, b.w, b.gidx, b.diag, b.dead, b.sdiag, 0, b.x.shape[0], per_row=True)
    width, rows = b.x.shape
    start, stop = b.span
    if start >= stop:
        zeros = b.x.new_zeros((), dtype=torch.float64), b.x.new_zeros((), dtype=torch.int64)
        return zeros if b.rule == CD else None
    dead = torch.zeros(width, dtype=torch.bool, device=b.x.device) if b.dead is None else b.dead
    sdiag = b.diag if b.sdiag is None else b.sdiag

    def per_entry(t):
        return t.unsqueeze(1).expand(width, rows)

    # No W in the shared order (dead columns are skipped): hat stands in for it.
    result = _launch(
        b, b.hat, per_entry(b.gidx), per_entry(b.diag), per_entry(dead), per_entry(sdiag), start, stop, False
    )
    return result if b.rule == CD else None
