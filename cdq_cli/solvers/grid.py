"""Uniform affine quantization grids: fit, quantize, dequantize.

A grid maps a weight ``w`` in column ``j`` of row ``i`` to an integer code
``c = clamp(round(w / s) + z, 0, 2**bits - 1)`` and back to ``s * (c - z)``, where ``s`` and ``z``
belong to the row's group containing ``j``. Scales and zero-points are always stored as
``(rows, n_groups)`` tensors (``n_groups = 1`` per channel; a per-layer grid repeats one value), so
every solver and the checkpoint see one shape convention. Zero-points are integer-valued floats,
which is what packed formats such as GPTQ's can hold.

A grid of a GGUF block type (``GridSpec.block_type``, see :mod:`.gguf_types`) has the same
form per sub-block plus an optional ``offset`` (``s · (c − z) + offset``, the types that store a
minimum) and keeps the type's stored scales in ``parts`` (:mod:`.gguf`). Uniform grids have
neither, and their arithmetic is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gguf_types import block_type as _block_type

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridSpec:
    """How a layer's grid is shaped: width, grouping along the input dimension, symmetry.

    ``block_type``: a GGUF block type (``Q4_K``...); bits, group size and symmetry are then the
    type's own (:meth:`of_type`) and the width must be a multiple of the type's block.
    """

    bits: int
    group_size: int | None = None
    sym: bool = False
    per_layer: bool = False
    block_type: str | None = None

    @classmethod
    def of_type(cls, name: str) -> GridSpec:
        """The grid of GGUF block type ``name`` (one-line ``ValueError`` for an unknown name)."""
        found = _block_type(name)
        return cls(found.bits, found.group, found.symmetric, False, found.name)

    def __post_init__(self) -> None:
        if self.block_type is not None:
            found = _block_type(self.block_type)
            if (self.bits, self.group_size, self.sym, self.per_layer) != (
                found.bits,
                found.group,
                found.symmetric,
                False,
            ):
                raise ValueError(f"a {found.name} grid is {found.bits}-bit in groups of {found.group}")
            return
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits}: choose one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group size must be positive, got {self.group_size}")
        if self.per_layer and self.group_size is not None:
            raise ValueError("a per-layer grid has one scale; it cannot also have a group size")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, columns: int) -> int:
        if self.block_type is not None:
            block = _block_type(self.block_type).block
            if columns % block:
                raise ValueError(
                    f"{self.block_type} needs an input width that is a multiple of {block}; "
                    f"this layer's is {columns}"
                )
        if self.group_size is None:
            return 1
        if columns % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the layer's input width {columns}"
            )
        return columns // self.group_size


@dataclass
class Grid:
    """A fitted grid: ``scale`` and ``zero`` of shape (rows, n_groups); ``offset`` (same shape) is
    added to every value (GGUF types with a stored minimum); ``parts`` are a GGUF grid's stored
    scales, from which ``scale``/``offset`` were computed (:func:`cdq_cli.solvers.gguf.grid_of`)."""

    spec: GridSpec
    scale: torch.Tensor
    zero: torch.Tensor
    offset: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] | None = None

    def expand(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-entry (rows, columns) scale and zero."""
        reps = columns // self.scale.shape[1]
        return (
            self.scale.repeat_interleave(reps, dim=1),
            self.zero.repeat_interleave(reps, dim=1),
        )

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``weight`` (as uint8) on this grid."""
        scale, zero, grouped = self._grouped(weight)
        if self.offset is not None:
            grouped = grouped - self.offset.unsqueeze(-1)
        if _numpy(grouped, scale, zero) and grouped.dtype == scale.dtype == zero.dtype:
            return _codes_in_pieces(grouped, scale, zero, self.spec.maxq).reshape(weight.shape)
        return cast(codes_of(grouped, scale, zero, self.spec.maxq), torch.uint8).reshape(weight.shape)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero, grouped = self._grouped(codes)
        values = dequantized(grouped, scale, zero)
        if self.offset is not None:  # GGUF's d·q − dmin·m: one float32 rounding, whatever the dtype
            values = (values.float() + self.offset.float().unsqueeze(-1)).to(values.dtype)
        return values.reshape(codes.shape)

    def without_offset(self) -> Grid:
        """The same scales and zeros with no offset: the grid of ``W − offset`` (what the solvers'
        kernels round to, whose rounding formula has no offset)."""
        return Grid(self.spec, self.scale, self.zero)

    def expand_offset(self, columns: int) -> torch.Tensor | None:
        """The per-entry (rows, columns) offset, or None."""
        if self.offset is None:
            return None
        return self.offset.repeat_interleave(columns // self.offset.shape[1], dim=1)

    def _grouped(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, groups, 1) scale and zero and the (rows, groups, group size) view of ``values``:
        the same arithmetic as :meth:`expand`'s per-entry tensors, without building them."""
        rows, columns = values.shape
        groups = self.scale.shape[1]
        grouped = values.reshape(rows, groups, columns // groups)
        return self.scale.unsqueeze(-1), self.zero.unsqueeze(-1), grouped

    def round(self, weight: torch.Tensor) -> torch.Tensor:
        """Nearest grid point of every entry (round-to-nearest)."""
        return self.dequantize(self.quantize(weight))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Grid:
        offset = None if self.offset is None else self.offset.to(device, dtype)
        parts = None if self.parts is None else {k: v.to(device) for k, v in self.parts.items()}
        return Grid(self.spec, self.scale.to(device, dtype), self.zero.to(device, dtype), offset, parts)


# On the CPU the elementwise steps of rounding run through numpy (same IEEE operations, same bits):
# with one thread torch took 2-3x longer for them (2048 x 8192: division by the row scales 39 ms,
# uint8 <-> float 31-75 ms; numpy's whole rounding 33 ms, its dequantization 16 ms). Measured by
# scripts/bench_rtn.py, whose time is mostly these steps besides the forwards.
_NUMPY = {torch.uint8: np.uint8, torch.float32: np.float32, torch.float64: np.float64}


def _numpy(*tensors: torch.Tensor) -> bool:
    """Whether ``tensors`` can take the numpy route: CPU, numpy dtypes, nothing needing grad."""
    return all(t.device.type == "cpu" and t.dtype in _NUMPY and not t.requires_grad for t in tensors)


def cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values.to(dtype)`` as a new tensor (through numpy on the CPU). Codes are integers 0..255,
    exact in every float dtype and back, so the result is the same bit for bit (tests/test_grid.py)."""
    if _numpy(values) and dtype in _NUMPY:
        with np.errstate(invalid="ignore"):  # a NaN has no code either way; the caller checks finiteness
            return torch.from_numpy(values.numpy().astype(_NUMPY[dtype]))
    return values.to(dtype, copy=True)


def codes_of(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Float-valued integer codes of ``values`` for elementwise-broadcast ``scale``/``zero``:
    ``clamp(round(values / scale) + zero, 0, maxq)``, round half to even, in place on one temporary."""
    if (
        _numpy(values, scale, zero)
        and values.dtype == scale.dtype == zero.dtype
        and values.is_floating_point()
    ):
        with np.errstate(all="ignore"):  # as torch: a zero scale gives inf/NaN codes, silently
            out = np.divide(values.numpy(), scale.numpy())
            np.rint(out, out=out)
            np.add(out, zero.numpy(), out=out)
            np.clip(out, 0, maxq, out=out)
        return torch.from_numpy(out)
    return (values / scale).round_().add_(zero).clamp_(0, maxq)


# Elements of one piece of :func:`_codes_in_pieces`: its float temporary (4 MB in float32) stays
# below the allocator's mmap threshold, so it is reused from the heap instead of being mapped and
# faulted in anew (a fresh 64 MB temporary cost 3-4x its arithmetic here).
PIECE_ELEMENTS = 1 << 20


def _codes_in_pieces(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> torch.Tensor:
    """uint8 :func:`codes_of` (its numpy route) a piece of rows at a time: the same operations on
    each element, so the same codes, with one small float temporary instead of a full-size one."""
    rows = values.shape[0]
    out = np.empty(tuple(values.shape), dtype=np.uint8)
    step = max(1, PIECE_ELEMENTS // max(1, values[0].numel()))
    for start in range(0, rows, step):
        piece = slice(start, start + step)
        # a scale or zero of one row broadcasts over every piece whole
        scales, zeros = (t[piece] if t.shape[0] == rows else t for t in (scale, zero))
        # exact: integer-valued floats in 0..maxq (NaN: unspecified, as torch's own cast)
        with np.errstate(invalid="ignore"):
            out[piece] = codes_of(values[piece], scales, zeros, maxq).numpy()
    return torch.from_numpy(out)


def dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale · (codes − zero)`` in ``scale``'s dtype for elementwise-broadcast ``scale``/``zero``
    (the codes converted as the subtraction reads them: one full-size result, no other temporary)."""
    if _numpy(codes, scale, zero) and scale.dtype == zero.dtype and scale.is_floating_point():
        with np.errstate(all="ignore"):
            out = np.subtract(codes.numpy(), zero.numpy(), dtype=_NUMPY[scale.dtype])
            np.multiply(out, scale.numpy(), out=out)
        return torch.from_numpy(out)
    return codes.to(scale.dtype, copy=True).sub_(zero).mul_(scale)


def _minmax_params(lo: torch.Tensor, hi: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges [lo, hi] (any shape), the GPTQ min–max convention.

    The range always includes zero; a degenerate range becomes [-1, 1] so no scale is 0.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def fit_minmax(weight: torch.Tensor, spec: GridSpec) -> Grid:
    """Min–max grid of ``weight`` (rows, columns) for ``spec`` (per channel, group or layer)."""
    check_weight(weight)
    rows, columns = weight.shape
    n_groups = spec.n_groups(columns)
    if spec.per_layer:
        lo = weight.min().reshape(1, 1)
        hi = weight.max().reshape(1, 1)
    else:
        grouped = weight.reshape(rows, n_groups, columns // n_groups)
        lo = grouped.amin(dim=2)
        hi = grouped.amax(dim=2)
    scale, zero = _minmax_params(lo, hi, spec)
    return Grid(spec, scale.expand(rows, n_groups).clone(), zero.expand(rows, n_groups).clone())


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``values``: one min/max pass (NaN propagates through both), no mask."""
    if values.numel() == 0:
        return True
    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Reject what no solver can work on: wrong rank and non-finite values."""
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)})")
    if not all_finite(weight):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} has {bad} NaN/Inf entries")


def fit_clipped(
    weight: torch.Tensor,
    spec: GridSpec,
    importance: torch.Tensor | None = None,
    *,
    steps: int = 20,
    max_shrink: float = 0.5,
) -> Grid:
    """Min–max grid with each group's range shrunk by the factor that best rounds its weights.

    Tries ``steps`` shrink factors in [1 − max_shrink, 1] and keeps, per group (per layer for a
    per-layer grid), the one with the lowest rounding error ``Σ_j importance_j (w_ij − q(w_ij))²``
    (``importance`` = diag Σ makes it the diagonal part of the layer objective). Clipping a few
    large weights buys finer steps for all the others, which matters most at 2–3 bits.
    """
    check_weight(weight)
    rows, columns = weight.shape
    n_groups = spec.n_groups(columns)
    weights = (
        torch.ones(columns, dtype=weight.dtype, device=weight.device) if importance is None else importance
    )
    weights = weights.to(weight.dtype).clamp_min(0)
    if spec.per_layer:
        lo, hi = weight.min().reshape(1, 1), weight.max().reshape(1, 1)
    else:
        grouped = weight.reshape(rows, n_groups, columns // n_groups)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    best_scale, best_zero = _minmax_params(lo, hi, spec)
    best_err = None
    # (rows, groups, group size) views: the grids broadcast over each group's columns.
    view = weight.reshape(rows, n_groups, columns // n_groups)
    importance3 = weights.reshape(1, n_groups, columns // n_groups)
    for k in range(steps):
        factor = 1.0 - max_shrink * k / max(1, steps - 1)
        scale, zero = _minmax_params(lo * factor, hi * factor, spec)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        # round_to_grid, then importance · (w − q)², in place on one buffer
        err = torch.div(view, s3).round_().add_(z3).clamp_(0, spec.maxq).sub_(z3).mul_(s3)
        err = err.sub_(view).pow_(2).mul_(importance3)
        err = err.sum().reshape(1, 1) if spec.per_layer else err.sum(dim=2)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return Grid(spec, best_scale.expand(rows, n_groups).clone(), best_zero.expand(rows, n_groups).clone())
