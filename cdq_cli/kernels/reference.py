"""The in-block kernel in plain torch: the reference every compiled backend is tested against.

Layout (see :mod:`cdq_cli.kernels`): matrices are (rows, columns) as the layer stores them.
``x`` and ``out`` hold the block's B columns; ``hat`` and ``w`` are whole (rows, p) matrices whose
block starts at column ``col0``. Grids are tables ``scale, zero`` (rows, groups) with ``gidx[j]``
the group of block column j.

Rules, for each block column ``j`` in ``[start, stop)`` in turn (every row at once), with
``c = col0 + j``:

* CD (``rule=CD``; ``x`` = the block's columns of ``G = E Σ``, ``diag`` = 1/Σ_jj,
  ``mat`` = Σ_bbᵀ, i.e. ``mat[j, k] = Σ[k, j]``)::

      dead column (Σ_jj = 0):  hat[:, c] = round(w[:, c]);  out[:, j] = 0      (no effect on f)
      t = hat[:, c] + x[:, j] · diag[j];   new = t if relax else round(t)
      out[:, j] = hat[:, c] − new;  hat[:, c] = new;  x[:, k] += mat[j, k] · out[:, j]   (k > j)

* GPTQ (``rule=GPTQ``; ``x`` = the block's error-updated weights, ``diag`` = Hinv_jj,
  ``mat`` = Hinv_bb; ``w`` is not read)::

      hat[:, c] = round(x[:, j]);  out[:, j] = (x[:, j] − hat[:, c]) / diag[j]
      x[:, k] −= mat[j, k] · out[:, j]                                                 (k > j)

``round(v) = s · (clamp(rint(v / s) + z, 0, maxq) − z)`` with ``s, z = scale[:, gidx[j]],
zero[:, gidx[j]]`` and ``rint`` rounding half to even — exactly :meth:`Grid.quantize` followed by
``dequantize``.

This implementation works on transposed copies of the block, (columns, rows), so that "column j
for every row" is a contiguous vector for torch's elementwise calls.
"""

from __future__ import annotations

import torch

CD = 0
GPTQ = 1
# Columns per inner sub-block of the shared-order CD kernel: rank-1 updates stay inside a
# sub-block, one small GEMM carries each sub-block's change to the rest of the block.
_SUB = 16


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``s · (clamp(round(v / s) + z, 0, maxq) − z)``: the grid rounding every backend uses."""
    codes = torch.div(values, scale).round_().add_(zero).clamp_(0, maxq)
    return codes.sub_(zero).mul_(scale)


def block(
    x: torch.Tensor,
    hat: torch.Tensor,
    w: torch.Tensor,
    col0: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    gidx: torch.Tensor,
    mat: torch.Tensor,
    diag: torch.Tensor,
    dead: torch.Tensor | None,
    out: torch.Tensor,
    *,
    maxq: int,
    relax: bool = False,
    rule: int = CD,
    start: int = 0,
    stop: int | None = None,
) -> None:
    """Shared column order: ``x, out`` (R, B); ``hat, w`` (R, p); ``scale, zero`` (R, groups);
    ``gidx, diag, dead`` (B,); ``mat`` (B, B). Updates ``x``, ``hat``, ``out`` in place."""
    width = x.shape[1]
    stop = width if stop is None else stop
    x_t = x.T.contiguous()
    out_t = out.T.contiguous()
    hat_t = hat[:, col0 : col0 + width].T.contiguous()
    s_t = scale.T.contiguous()
    z_t = zero.T.contiguous()
    groups = gidx.tolist()
    coef = diag.tolist()
    if rule == GPTQ:
        for j in range(start, stop):
            col = x_t[j]
            q = round_to_grid(col, s_t[groups[j]], z_t[groups[j]], maxq)
            hat_t[j] = q
            torch.sub(col, q, out=out_t[j]).div_(coef[j])
            if j + 1 < width:
                x_t[j + 1 :].addr_(mat[j, j + 1 :], out_t[j], alpha=-1)
    else:
        dead_cols = dead.tolist() if dead is not None else [False] * width
        w_t = w[:, col0 : col0 + width].T if any(dead_cols) else None
        for s0 in range(start, stop, _SUB):
            s1 = min(s0 + _SUB, stop)
            for j in range(s0, s1):
                s, z = s_t[groups[j]], z_t[groups[j]]
                if dead_cols[j]:
                    hat_t[j] = round_to_grid(w_t[j], s, z, maxq)
                    out_t[j].zero_()
                    continue
                old = hat_t[j]
                target = torch.add(old, x_t[j], alpha=coef[j])
                new = target if relax else round_to_grid(target, s, z, maxq)
                torch.sub(old, new, out=out_t[j])  # change of E = W − Ŵ
                hat_t[j] = new
                if j + 1 < s1:
                    x_t[j + 1 : s1].addr_(mat[j, j + 1 : s1], out_t[j])
            if s1 < width:  # the sub-block's change reaches the rest of the block in one small GEMM
                x_t[s1:].addmm_(mat[s0:s1, s1:].T, out_t[s0:s1])
    x.copy_(x_t.T)
    out.copy_(out_t.T)
    hat[:, col0 : col0 + width] = hat_t.T


def block_rows(
    x: torch.Tensor,
    hat: torch.Tensor,
    w: torch.Tensor,
    col0: int,
    scale: torch.Tensor,
    zero: torch.Tensor,
    gidx: torch.Tensor,
    mat: torch.Tensor,
    diag: torch.Tensor,
    dead: torch.Tensor,
    out: torch.Tensor,
    *,
    maxq: int,
    relax: bool = False,
) -> None:
    """Per-row orders (CD only): as :func:`block`, but every row has its own columns, so ``gidx``,
    ``diag`` and ``dead`` are (R, B) and ``mat`` is (R, B, B) (row i's ``mat[i, j, k]``)."""
    width = x.shape[1]
    s_blk = scale.gather(1, gidx)
    z_blk = zero.gather(1, gidx)
    for j in range(width):
        s, z = s_blk[:, j], z_blk[:, j]
        c = col0 + j
        old = hat[:, c]
        target = old + x[:, j] * diag[:, j]
        new = target if relax else round_to_grid(target, s, z, maxq)
        new = torch.where(dead[:, j], round_to_grid(w[:, c], s, z, maxq), new)
        delta = torch.where(dead[:, j], torch.zeros_like(old), old - new)
        hat[:, c] = new
        out[:, j] = delta
        if j + 1 < width:
            x[:, j + 1 :].addcmul_(delta.unsqueeze(1), mat[:, j, j + 1 :])
