"""The in-block kernel in plain torch: the reference every compiled backend is tested against.

One call works on one :class:`Block`, a record of its operands. Layout (see :mod:`cdq_cli.kernels`):
matrices are kept transposed, (columns, rows), so "column j for every row" is one contiguous
vector. ``x`` and ``out`` are the block's (B, R); ``hat``, ``err`` and ``w`` are whole (p, R)
matrices whose block starts at column ``col0``. Grids are tables ``scale, zero`` (groups, R) with
``gidx[j]`` the group of block column j.

Rules, for each block column ``j`` in ``[start, stop)`` in turn (every row at once), with
``c = col0 + j``:

* CD (``rule=CD``; ``x`` = the block's columns of ``G = E Σ``, ``diag`` = 1/Σ_jj, ``sdiag`` = Σ_jj,
  ``mat`` = Σ_bbᵀ, i.e. ``mat[j, k] = Σ[k, j]``)::

      dead column (Σ_jj = 0): skipped, out[j] = 0   (it cannot affect f; the caller sets it to
                                                    the rounding of W once, before the sweeps)
      t = hat[c] + x[j] · diag[j];   new = t if relax else round(t)
      out[j] = hat[c] − new;  hat[c] = new;  x[k] += mat[j, k] · out[j]      (k > j)

  and, when ``err`` (E = W − Ŵ) is given, ``err[c] += out[j]``. Returned: the objective change
  ``Σ out[j]·(2·x[j] + out[j]·sdiag[j])`` (``x[j]`` as column j was visited; float64) and the
  number of entries that changed.

* GPTQ (``rule=GPTQ``; ``x`` = the block's error-updated weights, ``diag`` = U_jj and ``mat`` =
  U_bb for the upper factor ``U`` of H⁻¹ = Uᵀ U; ``err``, ``dead`` are not read; returns None)::

      hat[c] = round(x[j]);  out[j] = (x[j] − hat[c]) / diag[j];  x[k] −= mat[j, k] · out[j]   (k > j)

* Per-row orders (CD only; ``mat`` is (R, B, B)): every row has its own columns, so ``gidx``,
  ``diag``, ``sdiag`` and ``dead`` are (B, R) and row i's coefficients are ``mat[i, j, k]``; a dead
  entry is set to the rounding of ``w`` (p, R) here. Callers pass transposed views of row-major
  (R, ·) storage.

``round(v) = s · (clamp(rint(v / s) + z, 0, maxq) − z)`` with ``s, z = scale[gidx[j]],
zero[gidx[j]]`` and ``rint`` rounding half to even — exactly :meth:`Grid.quantize` followed by
``dequantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CD = 0
GPTQ = 1
# Columns per inner sub-block of the shared-order CD kernel: rank-1 updates stay inside a
# sub-block, one small GEMM carries each sub-block's change to the rest of the block.
_SUB = 16


@dataclass
class Block:
    """The operands of one kernel call (shapes and rules: the module docstring).

    ``x``, ``hat``, ``out`` (and ``err``) are updated in place; the rest is read only. ``stop``
    None means the block's width.
    """

    rule: int
    x: torch.Tensor
    out: torch.Tensor
    hat: torch.Tensor
    col0: int
    scale: torch.Tensor
    zero: torch.Tensor
    gidx: torch.Tensor
    mat: torch.Tensor
    diag: torch.Tensor
    maxq: int
    relax: bool = False
    start: int = 0
    stop: int | None = None
    dead: torch.Tensor | None = None
    err: torch.Tensor | None = None
    sdiag: torch.Tensor | None = None
    w: torch.Tensor | None = None

    @property
    def per_row(self) -> bool:
        """Whether every row has its own column order (``mat`` is (R, B, B))."""
        return self.mat.dim() == 3

    @property
    def span(self) -> tuple[int, int]:
        """``(start, stop)`` with ``stop`` resolved."""
        return self.start, self.x.shape[0] if self.stop is None else self.stop


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``s · (clamp(round(v / s) + z, 0, maxq) − z)``: the grid rounding every backend uses."""
    codes = torch.div(values, scale).round_().add_(zero).clamp_(0, maxq)
    return codes.sub_(zero).mul_(scale)


def block(b: Block) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Run the block's column loop (the module docstring's rules); CD returns the objective change
    (float64) and the count of changed entries, GPTQ returns None."""
    if b.per_row:
        return _per_row(b)
    x, hat, out, col0, mat = b.x, b.hat, b.out, b.col0, b.mat
    width = x.shape[0]
    start, stop = b.span
    groups = b.gidx.tolist()
    coef = b.diag.tolist()
    if b.rule == GPTQ:
        for j in range(start, stop):
            col = x[j]
            q = round_to_grid(col, b.scale[groups[j]], b.zero[groups[j]], b.maxq)
            hat[col0 + j] = q
            torch.sub(col, q, out=out[j]).div_(coef[j])
            if j + 1 < width:
                x[j + 1 :].addr_(mat[j, j + 1 :], out[j], alpha=-1)
        return None
    dead_cols = b.dead.tolist() if b.dead is not None else [False] * width
    for s0 in range(start, stop, _SUB):
        s1 = min(s0 + _SUB, stop)
        for j in range(s0, s1):
            s, z = b.scale[groups[j]], b.zero[groups[j]]
            c = col0 + j
            if dead_cols[j]:
                out[j].zero_()
                continue
            old = hat[c]
            target = torch.add(old, x[j], alpha=coef[j])
            new = target if b.relax else round_to_grid(target, s, z, b.maxq)
            torch.sub(old, new, out=out[j])  # change of E = W − Ŵ
            hat[c] = new
            if j + 1 < s1:
                x[j + 1 : s1].addr_(mat[j, j + 1 : s1], out[j])
        if s1 < width:  # the sub-block's change reaches the rest of the block in one small GEMM
            x[s1:].addmm_(mat[s0:s1, s1:].T, out[s0:s1])
    sdiag = b.diag if b.sdiag is None else b.sdiag
    return finish_cd(x, b.err, col0, sdiag.unsqueeze(-1), out, start, stop)


def finish_cd(x, err, col0, sdiag, out, start, stop):
    """The CD kernel's return value from its outputs, and ``err`` (see the module docstring):
    after the loop, ``x[j]`` still holds G's column j as it was when j was visited. ``sdiag``
    broadcasts against ``out[start:stop]``."""
    delta = out[start:stop]
    if err is not None:
        err[col0 + start : col0 + stop] += delta
    gain = (delta * (2 * x[start:stop] + delta * sdiag[start:stop])).sum(dtype=torch.float64)
    return gain, torch.count_nonzero(delta)


def _per_row(b: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row orders: as the shared order, but every row has its own columns (no sub-blocks)."""
    x, hat, w, col0, mat = b.x, b.hat, b.w, b.col0, b.mat
    width = x.shape[0]
    s_blk = b.scale.gather(0, b.gidx)
    z_blk = b.zero.gather(0, b.gidx)
    for j in range(width):
        s, z = s_blk[j], z_blk[j]
        c = col0 + j
        old = hat[c]
        target = old + x[j] * b.diag[j]
        new = target if b.relax else round_to_grid(target, s, z, b.maxq)
        new = torch.where(b.dead[j], round_to_grid(w[c], s, z, b.maxq), new)
        delta = torch.where(b.dead[j], torch.zeros_like(old), old - new)
        hat[c] = new
        b.out[j] = delta
        if j + 1 < width:
            x[j + 1 :].addcmul_(mat[:, j, j + 1 :].T, delta.unsqueeze(0))
    return finish_cd(x, None, col0, b.sdiag, b.out, 0, width)
