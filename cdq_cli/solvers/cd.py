"""The one coordinate-descent kernel that QuantEase, COMQ and cdq's own method configure.

Objective ``f(Ŵ) = tr(E Σ Eᵀ)`` with ``E = W − Ŵ``. With ``G = E Σ``, the exact minimiser of
coordinate (i, j) over the reals is ``t_ij = Ŵ_ij + G_ij / Σ_jj`` and the best grid point is
``round(t_ij)`` (the objective is a parabola in that coordinate). Changing entry (i, j) of E by δ
changes ``G[i, :]`` by ``δ Σ_j:`` and the objective by ``δ (2 G_ij + δ Σ_jj)`` (G before the
change), which is how the sweep log's objectives are kept without recomputing ``tr(E Σ Eᵀ)``.

Column blocking (shared orders): before each block of B columns, one GEMM computes the block's
slice of G from the whole current E (``G[:, blk] = E Σ[:, blk]``); inside the block the fused
kernel (:mod:`cdq_cli.kernels`) runs the sequential column loop with rank-1 updates of that slice
only. These are the same updates as the plain sequential sweep, so results agree to floating-point
rounding; a sweep costs one ``2·q·p²`` GEMM (in p/B slices) plus the in-block work, and nothing
before the first sweep.

Internally matrices are kept transposed, (columns, rows), so "column j for every row" is a
contiguous vector. Rows never interact: on the CPU each thread sweeps its own range of rows,
block GEMMs included (:func:`cdq_cli.kernels.row_spans`), and only the sweep's totals are shared.

Two visiting modes:
* a shared order (cyclic, or any permutation such as decreasing diag Σ): columns are permuted
  once and swept cyclically, with true GEMMs;
* a per-row order (COMQ's greedy order differs per row): rows are processed in blocks, each row
  with its own permutation. The numba backend sweeps each row in natural coordinates (a changed
  entry updates that row of G); the torch and Triton backends gather Σ for each row's
  permutation and run the same in-block kernel on it (batched matrix products carry the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate

import torch

from ..kernels import CD, Block, backend_module, parallel, resolve, round_to_grid, row_spans
from .bands import once
from .grid import Grid
from .result import objective

ORDERS = ("cyclic", "diag", "greedy")
# Memory the per-row path may spend on gathered Σ rows (bytes).
_GATHER_BUDGET = 256 * 2**20


@dataclass
class SweepLog:
    """What a run of sweeps did: the objective change of each sweep, entries changed in each.

    ``objectives`` (after each sweep) is ``start`` plus the running sum of ``gains``; the start
    objective is computed on first use when the caller did not supply it, so a run whose
    objectives nobody reads costs no product for it. Equality ignores ``start``.
    """

    gains: list[float]
    changed: list[int]
    relaxed: list[bool]
    stalled: bool = False  # stopped because a sweep gained less than the tolerance
    start: float | None = field(default=None, compare=False)
    start_fn: Callable[[], float] | None = field(default=None, repr=False, compare=False)

    @property
    def sweeps(self) -> int:
        return len(self.gains)

    @property
    def objectives(self) -> list[float]:
        if self.start is None:
            if self.start_fn is None:
                raise ValueError("this sweep log has no start objective")
            self.start, self.start_fn = self.start_fn(), None
        return list(accumulate(self.gains, initial=self.start))[1:]

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
    start_objective: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, SweepLog]:
    """Run up to ``sweeps`` CD sweeps from ``start``; return the new Ŵ (rows, columns) and a log.

    ``order``: None (cyclic), a (columns,) permutation shared by all rows, or a (rows, columns)
    per-row permutation. ``relaxed[k]`` makes sweep k move each coordinate to its real-valued
    minimiser instead of a grid point. A rounded sweep that changes nothing ends the run early
    when ``stop_at_fixed_point``; with ``tolerance`` > 0 so does a rounded sweep that lowers the
    objective by less than that fraction (``log.stalled``): late sweeps move few entries and gain
    little, so this bounds the cost without moving uphill. Columns with Σ_jj = 0 do not affect the
    objective; they are set to the grid rounding of W.

    A grid with an offset (GGUF types with a minimum) is swept as ``W − offset`` on its
    offset-free grid. ``start_objective``: ``f(start)`` when the caller knows it (the log's
    objectives then cost no extra product). ``backend``: the in-block kernel (``torch``,
    ``numba``, ``triton``; default ``$CDQ_KERNEL`` or automatic, see :mod:`cdq_cli.kernels`).
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    if sweeps < 0:
        raise ValueError("sweeps must be >= 0")
    if grid.offset is not None:
        # ŵ = s·(c − z) + M: sweep W − M on the offset-free grid (same objective, same rounding
        # formula in every kernel), then add M back.
        shift = grid.expand_offset(weight.shape[1])
        approx, log = cd_sweeps(
            weight - shift,
            sigma,
            grid.without_offset(),
            start - shift,
            sweeps=sweeps,
            order=order,
            relaxed=relaxed,
            block_size=block_size,
            stop_at_fixed_point=stop_at_fixed_point,
            tolerance=tolerance,
            start_objective=start_objective,
            backend=backend,
        )
        return approx + shift, log
    relaxed = list(relaxed) if relaxed is not None else [False] * sweeps
    relaxed = (relaxed + [False] * sweeps)[:sweeps]
    name = resolve(weight, backend)
    block_size = min(block_size, getattr(backend_module(name), "MAX_BLOCK", block_size))
    if order is not None and order.dim() == 2:
        return _per_row(
            weight,
            sigma,
            grid,
            start,
            sweeps,
            order,
            relaxed,
            block_size,
            stop_at_fixed_point,
            tolerance,
            name,
        )
    return _shared(
        weight,
        sigma,
        grid,
        start,
        sweeps,
        order,
        relaxed,
        block_size,
        stop_at_fixed_point,
        tolerance,
        start_objective,
        name,
    )


def _inverse_diag(diag: torch.Tensor) -> torch.Tensor:
    """1/Σ_jj, and 0 for dead columns (Σ_jj = 0)."""
    safe = diag.clamp_min(torch.finfo(diag.dtype).tiny)
    return torch.where(diag > 0, 1.0 / safe, torch.zeros_like(diag))


def _shared(
    weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance, f0, name
):
    rows, columns = weight.shape
    device = weight.device
    maxq = grid.spec.maxq
    group_size = columns // grid.scale.shape[1]
    visited = torch.arange(columns, device=device) if order is None else order
    gidx = torch.div(visited, group_size, rounding_mode="floor")  # the group of each visited column
    if f0 is None and tolerance:
        f0 = objective(weight, start, sigma)  # the tolerance compares gains with the objective
    caller = (weight, start, sigma)

    def prepare():  # what depends on Σ and the order alone: once per layer (solvers.bands)
        # P Σ Pᵀ in one gather (indexing rows, then columns, would hold two copies at once)
        matrix = (sigma if order is None else sigma[order[:, None], order]).contiguous()
        diag = matrix.diagonal().contiguous()
        return diag, _SharedSweep(backend_module(name), matrix, block_size, gidx, diag, maxq)

    key = None if order is None else order.cpu().numpy().tobytes()
    diag, run = once(sigma, ("cd-shared", name, block_size, group_size, maxq, key), prepare)
    # Dead columns (Σ_jj = 0) cannot change f: they get the rounding of W once, and the sweeps
    # skip them.
    dead = diag <= 0
    dead = dead.nonzero().squeeze(1) if sweeps and bool(dead.any()) else None
    rows_of = partial(_SharedRows, weight, start, grid, order, gidx, dead, block_size)
    parts = parallel(name, [partial(rows_of, lo, hi) for lo, hi in row_spans(name, rows, columns)])
    log = SweepLog([], [], [], start=f0)
    if f0 is None:
        log.start_fn = lambda: objective(*caller)
    previous = f0
    for sweep in range(sweeps):
        relax = relaxed[sweep]
        results = parallel(name, [partial(run.sweep, part, relax) for part in parts])
        gain = sum(float(g) for g, _ in results)
        changed = sum(int(c) for _, c in results)
        log.gains.append(gain)
        log.changed.append(0 if relax else changed)
        log.relaxed.append(relax)
        if stop_at_fixed_point and not relax and log.changed[-1] == 0:
            break
        if tolerance and not relax and -log.gains[-1] < tolerance * abs(previous):
            log.stalled = True
            break
        if previous is not None:
            previous += log.gains[-1]
    approx = torch.empty_like(weight)
    inverse = None if order is None else torch.argsort(order)
    parallel(name, [partial(part.write, approx, inverse) for part in parts])
    return approx, log


def _transposed(rows: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """``rows.T`` as a contiguous copy, its rows (the input columns) in ``order`` when given.
    (Reading strided and writing contiguously is the fast way round for torch's copies.)"""
    if order is None:
        return rows.T.clone(memory_format=torch.contiguous_format)
    return rows.T[order].contiguous()


class _SharedRows:
    """Rows lo..hi of a shared-order run, in transposed working copies (row j is input column j
    for every row of the span): Ŵᵀ, Eᵀ = (W − Ŵ)ᵀ, the grid's tables, and a block's G and Δ."""

    def __init__(self, weight, start, grid, order, gidx, dead, block_size, lo, hi):
        """Copies of rows lo..hi in the visited column ``order``; ``dead`` columns (visited
        positions) start at the rounding of W."""
        self.lo, self.hi = lo, hi
        w_t, self.hat = _transposed(weight[lo:hi], order), _transposed(start[lo:hi], order)
        self.scale = grid.scale[lo:hi].T.contiguous()  # (groups, rows)
        self.zero = grid.zero[lo:hi].T.contiguous()
        if dead is not None:
            groups = gidx[dead]
            self.hat[dead] = round_to_grid(w_t[dead], self.scale[groups], self.zero[groups], grid.spec.maxq)
        self.err = w_t.sub_(self.hat)  # E = W − Ŵ
        self.g = self.hat.new_empty(min(block_size, self.hat.shape[0]), hi - lo)
        self.delta = torch.empty_like(self.g)

    def write(self, approx, inverse):
        """Ŵ of these rows into ``approx`` (natural column order when ``inverse`` is given)."""
        hat = self.hat if inverse is None else self.hat[inverse]
        approx[self.lo : self.hi] = hat.T


class _SharedSweep:
    """One sweep of a span's rows, block by block: a GEMM brings the block's G up to date from
    the span's whole current E, then the in-block kernel runs the block's column loop."""

    def __init__(self, kernel, sigma, block_size, gidx, diag, maxq):
        self.kernel, self.sigma, self.maxq = kernel, sigma, maxq
        dead = diag <= 0
        inv_d = _inverse_diag(diag)
        columns = sigma.shape[0]
        self.blocks = [
            # (b0, b1, mat with mat[j, k] = Σ[k, j], the block's groups, 1/Σ_jj, dead columns, Σ_jj)
            (b0, b1, sigma[b0:b1, b0:b1].T.contiguous(), gidx[b0:b1], inv_d[b0:b1], dead[b0:b1], diag[b0:b1])
            for b0, b1 in ((b0, min(b0 + block_size, columns)) for b0 in range(0, columns, block_size))
        ]

    def sweep(self, rows: _SharedRows, relax: bool) -> tuple[torch.Tensor, torch.Tensor]:
        device = rows.hat.device
        gain = torch.zeros((), dtype=torch.float64, device=device)
        changed = torch.zeros((), dtype=torch.int64, device=device)
        for b0, b1, mat, gidx, inv_d, dead, diag in self.blocks:
            # (E Σ)ᵀ for this block, from the span's whole current E
            g_blk = torch.matmul(self.sigma[b0:b1], rows.err, out=rows.g[: b1 - b0])
            block_gain, block_changed = self.kernel.block(
                Block(
                    CD,
                    g_blk,
                    rows.delta[: b1 - b0],
                    rows.hat,
                    b0,
                    rows.scale,
                    rows.zero,
                    gidx,
                    mat,
                    inv_d,
                    self.maxq,
                    relax=relax,
                    dead=dead,
                    err=rows.err,
                    sdiag=diag,
                )
            )
            gain += block_gain
            changed += block_changed
        return gain, changed


def _per_row(
    weight, sigma, grid, start, sweeps, order, relaxed, block_size, stop_at_fixed_point, tolerance, name
):
    kernel = backend_module(name)
    rows, columns = weight.shape
    maxq = grid.spec.maxq
    group_size = columns // grid.scale.shape[1]
    sigma = sigma.contiguous()
    diag = sigma.diagonal().contiguous()
    inv_d = _inverse_diag(diag)
    elt = sigma.element_size()
    row_block = max(1, min(rows, _GATHER_BUDGET // max(1, block_size * columns * elt)))
    out = start.clone(memory_format=torch.contiguous_format)
    # Every row block runs its sweeps independently (rows never interact), then logs are summed.
    gains = [0.0] * sweeps
    changed_total = [0] * sweeps
    start_total = 0.0
    ran = 0
    stalled = False
    for r0 in range(0, rows, row_block):
        r1 = min(r0 + row_block, rows)
        w_r = weight[r0:r1].contiguous()
        hat_r = out[r0:r1]
        g = (w_r - hat_r) @ sigma
        previous = float(((w_r - hat_r) * g).sum(dtype=torch.float64))  # f = Σ E ∘ G
        start_total += previous
        if name == "numba":
            sweep_rows = _numba_rows(kernel, w_r, hat_r, g, grid, r0, r1, group_size, sigma, diag, inv_d)
        else:
            sweep_rows = _gathered_rows(kernel, w_r, hat_r, g, grid, r0, r1, group_size, sigma, diag, inv_d)
        for sweep in range(sweeps):
            relax = relaxed[sweep]
            gain, changed = sweep_rows(order[r0:r1], block_size, maxq, relax)
            changed = 0 if relax else changed
            gains[sweep] += gain
            changed_total[sweep] += changed
            ran = max(ran, sweep + 1)
            done = stop_at_fixed_point and not relax and changed == 0
            gained_little = bool(tolerance) and not relax and -gain < tolerance * abs(previous)
            if done or gained_little:
                # This block stops here; its objective stays as it is for the later sweeps.
                stalled = stalled or (gained_little and not done)
                break
            previous += gain
        sweep_rows.finish()
    log = SweepLog(gains[:ran], changed_total[:ran], relaxed[:ran], stalled, start=start_total)
    return out, log


class _numba_rows:
    """Sweeps of a row block with the numba per-row kernel, in natural coordinates (in place)."""

    def __init__(self, kernel, w_r, hat_r, g, grid, r0, r1, group_size, sigma, diag, inv_d):
        self.kernel, self.w, self.hat, self.g = kernel, w_r, hat_r, g
        self.scale = grid.scale[r0:r1].contiguous()
        self.zero = grid.zero[r0:r1].contiguous()
        self.group_size, self.sigma, self.diag, self.inv_d = group_size, sigma, diag, inv_d

    def __call__(self, perm, block_size, maxq, relax):
        gains, changed = self.kernel.row_sweep(
            self.g,
            self.hat,
            self.w,
            self.scale,
            self.zero,
            self.group_size,
            self.sigma,
            self.diag,
            self.inv_d,
            perm.contiguous(),
            maxq=maxq,
            relax=relax,
        )
        return float(gains.sum()), int(changed.sum())

    def finish(self):
        pass


class _gathered_rows:
    """Sweeps of a row block in permuted coordinates with Σ gathered per row (torch, Triton)."""

    def __init__(self, kernel, w_r, hat_r, g, grid, r0, r1, group_size, sigma, diag, inv_d):
        self.kernel, self.hat_r, self.g, self.sigma = kernel, hat_r, g, sigma
        self.perm = None
        self.w_r = w_r
        self.scale = grid.scale[r0:r1]
        self.zero = grid.zero[r0:r1]
        self.group_size, self.diag, self.inv_d = group_size, diag, inv_d

    def __call__(self, perm, block_size, maxq, relax):
        if self.perm is None:  # permuted working copies, kept across this block's sweeps
            self.perm = perm
            self.w_p = self.w_r.gather(1, perm)
            self.hat_p = self.hat_r.gather(1, perm)
            self.inv_d_p = self.inv_d[perm]
            self.diag_p = self.diag[perm]
            self.dead_p = self.diag_p <= 0
            self.gidx_p = torch.div(perm, self.group_size, rounding_mode="floor")
        g, columns = self.g, perm.shape[1]
        gain = torch.zeros((), dtype=torch.float64, device=g.device)
        changed = torch.zeros((), dtype=torch.int64, device=g.device)
        for b0 in range(0, columns, block_size):
            b1 = min(b0 + block_size, columns)
            cols = perm[:, b0:b1]  # (R, B)
            sig_rows = self.sigma[cols]  # (R, B, p): Σ rows of this block's columns, per row
            sig_bb = sig_rows.gather(2, cols.unsqueeze(1).expand(-1, b1 - b0, -1))  # (R, B, B)
            g_blk = g.gather(1, cols)
            delta = torch.empty_like(g_blk)
            block_gain, block_changed = self.kernel.block(
                Block(
                    CD,
                    g_blk.T,
                    delta.T,
                    self.hat_p.T,
                    b0,
                    self.scale.T,
                    self.zero.T,
                    self.gidx_p[:, b0:b1].T,
                    sig_bb,
                    self.inv_d_p[:, b0:b1].T,
                    maxq,
                    relax=relax,
                    dead=self.dead_p[:, b0:b1].T,
                    sdiag=self.diag_p[:, b0:b1].T,
                    w=self.w_p.T,
                )
            )
            g += torch.bmm(delta.unsqueeze(1), sig_rows).squeeze(1)
            gain += block_gain
            changed += block_changed
        return float(gain), int(changed)

    def finish(self):
        if self.perm is not None:
            self.hat_r.scatter_(1, self.perm, self.hat_p)
