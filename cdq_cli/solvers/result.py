"""The one result type every solver returns, and the shared objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .grid import Grid, all_finite, check_weight


@dataclass
class QuantResult:
    """A quantized layer.

    ``weight`` is the dequantized matrix the model will use: ``grid.dequantize(codes)`` plus
    ``outliers`` (a dense matrix, zero except at kept full-precision entries) when present.
    ``objective`` is ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` of that weight; ``objective_start`` the same for
    the point the solver started from (for RTN/GPTQ, equal to ``objective``).
    """

    method: str
    weight: torch.Tensor
    codes: torch.Tensor
    grid: Grid
    objective: float
    objective_start: float
    sweeps: int = 0
    seconds: float = 0.0
    outliers: torch.Tensor | None = None
    history: list[float] = field(default_factory=list)
    # Each row's share of ``objective`` (float64, (rows,)) where the solver keeps it (GPTQ).
    row_objective: torch.Tensor | None = None

    @property
    def scale(self) -> torch.Tensor:
        return self.grid.scale

    @property
    def zero(self) -> torch.Tensor:
        return self.grid.zero

    @property
    def outlier_count(self) -> int:
        return 0 if self.outliers is None else int((self.outliers != 0).sum())


# Bytes a float64 temporary may take before the work is split into pieces (Σ slabs, row tiles,
# per-row normal systems). A 28,672-wide Σ in float64 is 6.6 GB; its slabs here are 64 MB. A few
# pieces are alive at once (a Σ slab, an error tile, their product), so the transient is a few
# times this: at 256 MB it was the peak of a whole lazy 1.6B-parameter run (bench_big.py).
CHUNK_BYTES = 64 << 20


def spans(total: int, per_item_bytes: int, budget: int | None = None) -> list[slice]:
    """``range(total)`` cut into consecutive slices of at most ``budget // per_item_bytes`` items
    (at least one each): one slice when everything fits."""
    budget = CHUNK_BYTES if budget is None else budget
    step = max(1, budget // max(1, per_item_bytes))
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def objective(
    weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor, *, budget: int | None = None
) -> float:
    """``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` = ``‖(W − Ŵ) X‖²``, computed in float64 (the reference).

    Never a whole float64 copy of Σ or W − Ŵ larger than ``budget`` bytes (``CHUNK_BYTES``):
    Σ is taken in column slabs ``Σ[:, J]`` and the error in row tiles ``E[I]``, and the sum is
    ``Σ_J Σ_I ⟨E[I] Σ[:, J], E[I, J]⟩``. When both fit, that is the single product (same bits).
    """
    err = weight - approx
    rows, columns = err.shape
    total = 0.0
    for cols in spans(columns, 8 * columns, budget):
        slab = sigma[:, cols].to(torch.float64)
        for tile in spans(rows, 8 * columns, budget):
            e = err[tile].to(torch.float64)
            total += float(((e @ slab) * e[:, cols]).sum())
    return total


# Relative gap below which a decision between two working-dtype objectives is re-made in float64.
CLOSE = 1e-5


# Row tiles of the working-dtype products (:func:`working_objective`, :func:`working_energy`):
# a 2048 x 8192 float32 layer is 4 tiles, so its error and product take 32 MB, not 128.
TILE_BYTES = 16 << 20


def working_objective(weight: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    """``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)`` in Σ's dtype (one GEMM per row tile of at most
    :data:`TILE_BYTES`; one product when the layer fits), summed in float64.

    What solvers report and decide with: on real SmolLM2 layers in float32 it was within 2e-7
    (relative) of :func:`objective`, while the float64 product costs about two float32 GEMMs.
    Decisions closer than ``CLOSE`` are re-made with :func:`objective` (see :func:`lower`).
    """
    rows, columns = weight.shape
    total = 0.0
    for tile in spans(rows, weight.element_size() * columns, TILE_BYTES):
        err = weight[tile] - approx[tile]
        total += float((err @ sigma).mul_(err).sum(dtype=torch.float64))
    return total


def working_energy(weight: torch.Tensor, sigma: torch.Tensor) -> float:
    """``‖W X‖²`` = ``tr(W Σ Wᵀ)`` in Σ's dtype, summed in float64, a row tile at a time (no
    product larger than :data:`TILE_BYTES`): the scale a layer's objective is reported relative to.
    One GEMM, where :func:`objective` in float64 costs several."""
    rows, columns = weight.shape
    total = 0.0
    for tile in spans(rows, weight.element_size() * columns, TILE_BYTES):
        w = weight[tile]
        total += float((w @ sigma).mul_(w).sum(dtype=torch.float64))
    return total


def lower(
    new: float,
    old: float,
    exact: Callable[[], tuple[float, float]],
    *,
    margin: float = 0.0,
    or_equal: bool = False,
) -> tuple[bool, float, float]:
    """Whether ``new < old·(1 − margin)`` (``<=`` with ``or_equal``) for two working-dtype
    objectives; when they are within ``CLOSE`` of each other, ``exact()`` gives both in float64 and
    those decide. Returns the decision and the two values it used."""
    if abs(new - old) <= CLOSE * max(abs(old), abs(new)):
        new, old = exact()
    bound = old * (1 - margin)
    return (new <= bound if or_equal else new < bound), new, old


def check_problem(weight: torch.Tensor, sigma: torch.Tensor) -> None:
    """Validate a (weight, Σ) pair with one-line messages naming the problem."""
    check_weight(weight)
    columns = weight.shape[1]
    if sigma.dim() != 2 or sigma.shape != (columns, columns):
        raise ValueError(
            f"sigma must be ({columns}, {columns}) for a weight with {columns} inputs, "
            f"got shape {tuple(sigma.shape)}"
        )
    if not all_finite(sigma):
        raise ValueError("sigma has NaN/Inf entries")
    if not bool((sigma.diagonal() > 0).any()):
        raise ValueError("sigma is all zero on its diagonal: the calibration inputs were all zero or empty")


def cholesky_in_place(h: torch.Tensor, failure: str) -> torch.Tensor:
    """The lower Cholesky factor of the symmetric, C-contiguous ``h``, made in ``h``'s own memory:
    ``h.mT`` is the same matrix, column-major, the layout torch factors in place (LAPACK's
    ``potrf``; any other ``out`` layout is factored in a temporary and copied back). ``ValueError``
    (``failure``) when ``h`` is not positive definite."""
    info = torch.empty((), dtype=torch.int32, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h.mT, out=(h.mT, info))
    if int(info) != 0:
        raise ValueError(failure)
    return lower


def damping_term(sigma: torch.Tensor, fraction: float) -> torch.Tensor:
    """λ·mean(diag Σ): what damping adds to Σ's diagonal (to any copy of Σ, permuted or not)."""
    return fraction * sigma.diagonal().mean()


def damp(sigma: torch.Tensor, fraction: float) -> torch.Tensor:
    """Σ + λ·mean(diag Σ)·I (a copy); ``fraction`` = 0 returns Σ itself."""
    if fraction <= 0:
        return sigma
    out = sigma.clone()
    out.diagonal().add_(damping_term(sigma, fraction))
    return out


def check_finite(weight: torch.Tensor, method: str) -> None:
    """Fail loudly rather than hand a NaN weight to the model."""
    if not all_finite(weight):
        raise FloatingPointError(f"{method} produced non-finite weights")
