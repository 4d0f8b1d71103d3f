"""The one coordinate-descent kernel that QuantEase, COMQ and cdq's own method configure.

Objective ``f(Ŵ) = tr(E Σ Eᵀ)`` with ``E = W − Ŵ``. With ``G = E Σ`` kept current, the exact
minimiser of coordinate (i, j) over the reals is ``t_ij = Ŵ_ij + G_ij / Σ_jj`` and the best grid
point is ``round(t_ij)`` (the objective is a parabola in that coordinate). Changing column j by
``ΔE_:j`` changes ``G`` by ``ΔE_:j Σ_j:``.

Column blocking: inside a block of B columns only the block's slice of G is updated (rank-1 per
column); after the block, its change reaches the rest of G in one GEMM. These are the same updates
as the plain sequential sweep, so results agree to floating-point rounding.

Internally matrices are kept transposed, (columns, rows), so "column j for every row" is a
contiguous vector.

Two visiting modes:
* a shared order (cyclic, or any permutation such as decreasing diag Σ): columns are permuted
  once and swept cyclically, with true GEMMs;
* a per-row order (COMQ's greedy order differs per row): rows are processed in blocks, each row
  with its own permutation, Σ gathered for that permutation (batched matrix products).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .grid import Grid

ORDERS = ("cyclic", "diag", "greedy")
# Memory the per-row path may spend on gathered Σ rows (bytes).
_GATHER_BUDGET = 256 * 2**20
# Columns per inner sub-block of the shared-order sweep.
_SUB = 16


def _rounded(values: torch.Tensor, inv_s: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int):
    """Nearest grid point, s·(clamp(round(v/s) + z) − z), with few temporaries."""
    codes = torch.addcmul(z, values, inv_s).round_().clamp_(0, maxq)
    return codes.sub_(z).mul_(s)


@dataclass
class SweepLog:
    """What a run of sweeps did: objective after each sweep, entries changed in each."""

    objectives: list[float]
    changed: list[int]
    relaxed: list[bool]
    stalled: bool = False  # stopped because a sweep gained less than the tolerance

    @property
    def sweeps(self) -> int:
        return len(self.objectives)

    @property
    def reached_fixed_point(self) -> bool:
        return bool(self.changed) and self.changed[-1] == 0 and not self.relaxed[-1] and not self.stalled


def order_permutation(kind: str, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
    """Visiting order by name: ``cyclic`` → None, ``diag`` → (p,), ``greedy`` → (q, p) per row."""
    if kind == "cyclic":
        return None
    if kind == "diag":
        return torch.argsort(sigma.diagonal(), descending=True, stable=True)
    if kind == "greedy":
        norms = sigma.diagonal().clamp_min(0).sqrt()
        return torch.argsort(weight.abs() * norms, dim=1, descending=True, stable=True)
    raise ValueError(f"unknown visiting order {kind!r}: choose cyclic, diag or greedy")


def cd_sweeps(
    weight: torch.Tensor,
    sigma: torch.Tensor,
    grid: Grid,
    start: torch.Tensor,
    *,
    sweeps: int,
    order: torch.Tensor | None = None,
    relaxed: Sequence[bool] | None = None,
    block_size: int = 128,
    stop_at_fixed_point: bool = True,
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, SweepLog]:
    """Run up to ``sweeps`` CD sweeps from ``start``; return the new Ŵ (rows, columns) and a log.

    ``order``: None (cyclic), a (columns,) permutation shared by all rows, or a (rows, columns)
    per-row permutation. ``relaxed[k]`` makes sweep k move each coordinate to its real-valued
    minimiser instead of a grid point. A rounded sweep that changes nothing ends the run early
    when ``stop_at_fixed_point``; with ``tolerance`` > 0 so does a rounded sweep that lowers the
    objective by less than that fraction (``log.stalled``): late sweeps move few entries and gain
    little, so this bounds the cost without moving uphill. Columns with Σ_jj = 0 do not affect the
    objective; they are set to the grid rounding of W.
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    if sweeps < 0:
        raise ValueError("sweeps must be >= 0")
    relaxed = list(relaxed) if relaxed is not None else [False] * sweeps
    relaxed = (relaxed + [False] * sweeps)[:sweeps]
    if order is not None and order.dim() == 2:
        return _per_row(
            weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance
        )
    return _shared(
        weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance
    )


def _shared(weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance):
    columns = weight.shape[1]
    scale, zero = grid.expand(columns)
    maxq = grid.spec.maxq
    if order is not None:
        weight, start, scale, zero = (m[:, order] for m in (weight, start, scale, zero))
        sigma = sigma[order][:, order]
    # Transposed working copies: row j is input column j for every output row.
    w_t = weight.T.contiguous()
    hat_t = start.T.contiguous().clone()
    inv_s = (1.0 / scale).T.contiguous()
    s_t = scale.T.contiguous()
    z_t = zero.T.contiguous()
    diag = sigma.diagonal()
    dead = (diag <= 0).tolist()
    inv_d = torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny), torch.zeros_like(diag))
    inv_d_list = inv_d.tolist()
    g_t = sigma @ (w_t - hat_t)  # (E Σ)ᵀ = Σ Eᵀ since Σ is symmetric
    log = SweepLog([], [], [])
    previous = float(((w_t - hat_t) * g_t).sum()) if tolerance else 0.0  # only the tolerance reads it
    for sweep in range(sweeps):
        relax = relaxed[sweep]
        changed = 0
        for b0 in range(0, columns, block_size):
            b1 = min(b0 + block_size, columns)
            sig_bb = sigma[b0:b1, b0:b1]
            g_blk = g_t[b0:b1].clone()
            delta_blk = torch.zeros_like(g_blk)
            width = b1 - b0
            # Two levels of laziness: rank-1 updates only inside a sub-block of _SUB columns,
            # a small GEMM carries each sub-block's change to the rest of the block.
            for s0 in range(0, width, _SUB):
                s1 = min(s0 + _SUB, width)
                for jl in range(s0, s1):
                    j = b0 + jl
                    if dead[j]:
                        hat_t[j] = _rounded(w_t[j], inv_s[j], s_t[j], z_t[j], maxq)
                        continue
                    old = hat_t[j]
                    target = torch.add(old, g_blk[jl], alpha=inv_d_list[j])
                    new = target if relax else _rounded(target, inv_s[j], s_t[j], z_t[j], maxq)
                    delta = torch.sub(old, new, out=delta_blk[jl])  # change of E = W − Ŵ
                    hat_t[j] = new
                    if jl + 1 < s1:
                        g_blk[jl + 1 : s1].addr_(sig_bb[jl + 1 : s1, jl], delta)
                if s1 < width:
                    g_blk[s1:].addmm_(sig_bb[s1:, s0:s1], delta_blk[s0:s1])
            g_t.addmm_(sigma[:, b0:b1], delta_blk)
            if not relax:
                changed += int(torch.count_nonzero(delta_blk))
        value = float(((w_t - hat_t) * g_t).sum())
        log.objectives.append(value)
        log.changed.append(changed)
        log.relaxed.append(relax)
        if stop_at_fixed_point and not relax and changed == 0:
            break
        if tolerance and not relax and previous - value < tolerance * abs(previous):
            log.stalled = True
            break
        previous = value
    approx = hat_t.T
    if order is not None:
        approx = approx[:, torch.argsort(order)]
    return approx.contiguous(), log


def _per_row(weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance):
    rows, columns = weight.shape
    scale, zero = grid.expand(columns)
    maxq = grid.spec.maxq
    diag = sigma.diagonal()
    inv_d = torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny), torch.zeros_like(diag))
    elt = sigma.element_size()
    row_block = max(1, min(rows, _GATHER_BUDGET // max(1, block_size * columns * elt)))
    out = start.clone()
    # Every row block runs its sweeps independently (rows never interact), then logs are summed.
    objectives = [0.0] * sweeps
    changed_total = [0] * sweeps
    ran = 0
    stalled = False
    for r0 in range(0, rows, row_block):
        r1 = min(r0 + row_block, rows)
        perm = order[r0:r1]
        w_p, hat_p, s_p, z_p = (m[r0:r1].gather(1, perm) for m in (weight, out, scale, zero))
        inv_d_p = inv_d[perm]
        dead_p = diag[perm] <= 0
        g = (weight[r0:r1] - out[r0:r1]) @ sigma  # original coordinates
        previous = float(((weight[r0:r1] - out[r0:r1]) * g).sum()) if tolerance else 0.0
        for sweep in range(sweeps):
            relax = relaxed[sweep]
            changed = 0
            for b0 in range(0, columns, block_size):
                b1 = min(b0 + block_size, columns)
                cols = perm[:, b0:b1]  # (R, B)
                sig_rows = sigma[cols]  # (R, B, p): Σ rows of this block's columns, per row
                sig_bb = sig_rows.gather(2, cols.unsqueeze(1).expand(-1, b1 - b0, -1))  # (R, B, B)
                g_blk = g.gather(1, cols)
                delta_blk = torch.zeros_like(g_blk)
                for jl in range(b1 - b0):
                    k = b0 + jl
                    old = hat_p[:, k]
                    target = old + g_blk[:, jl] * inv_d_p[:, k]
                    rounded_w = s_p[:, k] * (
                        torch.clamp(torch.round(w_p[:, k] / s_p[:, k]) + z_p[:, k], 0, maxq) - z_p[:, k]
                    )
                    if relax:
                        new = target
                    else:
                        new = s_p[:, k] * (
                            torch.clamp(torch.round(target / s_p[:, k]) + z_p[:, k], 0, maxq) - z_p[:, k]
                        )
                    new = torch.where(dead_p[:, k], rounded_w, new)
                    delta = torch.where(dead_p[:, k], torch.zeros_like(old), old - new)
                    hat_p[:, k] = new
                    delta_blk[:, jl] = delta
                    if jl + 1 < b1 - b0:
                        g_blk[:, jl + 1 :].addcmul_(delta.unsqueeze(1), sig_bb[:, jl, jl + 1 :])
                g += torch.bmm(delta_blk.unsqueeze(1), sig_rows).squeeze(1)
                if not relax:
                    changed += int(torch.count_nonzero(delta_blk))
            err = weight[r0:r1] - out[r0:r1].scatter(1, perm, hat_p)
            value = float((err * g).sum())
            objectives[sweep] += value
            changed_total[sweep] += changed
            ran = max(ran, sweep + 1)
            done = stop_at_fixed_point and not relax and changed == 0
            gained_little = bool(tolerance) and not relax and previous - value < tolerance * abs(previous)
            if done or gained_little:
                # This block stops here; its objective stays as it is for the later sweeps.
                stalled = stalled or (gained_little and not done)
                for later in range(sweep + 1, sweeps):
                    objectives[later] += value
                break
            previous = value
        out[r0:r1] = out[r0:r1].scatter(1, perm, hat_p)
    log = SweepLog(objectives[:ran], changed_total[:ran], relaxed[:ran], stalled)
    return out, log
