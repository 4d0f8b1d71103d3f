"""Fused in-block kernels for coordinate descent and GPTQ: Triton on GPU, numba on CPU, torch as
the reference and fallback.

The math (see DESIGN.md, "The in-block kernel"). For a layer ``W`` (q×p), ``Σ = X Xᵀ`` and the
error ``E = W − Ŵ``, coordinate descent keeps ``G = E Σ``; the exact minimiser of entry (i, j)
with the others fixed is ``t_ij = Ŵ_ij + G_ij / Σ_jj``, and the best grid point is ``round(t_ij)``.
Columns are processed in blocks of B. Inside a block, for every row at once::

    for j in block:                                  # sequential
        t      = Ŵ[:, j] + G[:, j] / Σ_jj            (relaxed sweep: new = t)
        new    = grid_round(t)
        δ      = Ŵ[:, j] − new ;  Ŵ[:, j] = new       (δ is the change of E)
        G[:, j+1:B] += δ ⊗ Σ_bb[j, j+1:B]

and one GEMM outside the kernel brings the block's G up to date from the whole current E before
the block (``G[:, blk] = E Σ[:, blk]``). GPTQ's loop has the same shape: ``q = grid_round(W[:, j])``,
``err = (W[:, j] − q) / U_jj``, ``W[:, j+1:B] −= err ⊗ U[j, j+1:B]`` with U_bb the block's part of
H⁻¹'s upper factor, and one GEMM before the block against the finished columns (see
:mod:`cdq_cli.solvers.gptq`). One kernel with two update rules (``CD``, ``GPTQ``) runs the whole
sequential column loop of a block in one call.

``grid_round(v) = s·(clamp(rint(v/s) + z, 0, maxq) − z)``, ``rint`` rounding half to even, the
same expression as :meth:`Grid.quantize`, in every backend: ties round the same way everywhere.

Layout: per-entry operands are indexed ``[j, i]`` (column j of the block, row i), so "column j for
every row" is contiguous. Grids are passed as tables ``scale, zero`` (groups, rows) plus the group
``gidx[j]`` of each block column. One call takes one record, :class:`Block`, holding all of this.

Rows never interact, in CD or in GPTQ: on the CPU the solvers give each thread a contiguous range
of rows (:func:`row_spans`) and run the whole column loop of those rows there, GEMMs included
(:func:`parallel`, :mod:`cdq_cli.kernels.threads`); with the torch and Triton backends there is
one range and the parallelism is inside torch or on the GPU.

Backends (``backend=`` argument, else ``$CDQ_KERNEL``, else automatic):

* ``triton`` — CUDA tensors (automatic there); on CPU tensors only under ``TRITON_INTERPRET=1``.
* ``numba`` — CPU tensors (automatic when numba imports); also sweeps per-row orders (COMQ's
  greedy order) row by row in natural coordinates, with no gathered Σ (``row_sweep``).
* ``torch`` — anywhere; the reference the others are tested against.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from . import reference, threads
from .reference import CD, GPTQ, Block, round_to_grid

BACKENDS = ("torch", "numba", "triton")
ENV = "CDQ_KERNEL"

__all__ = [
    "BACKENDS",
    "CD",
    "ENV",
    "GPTQ",
    "Block",
    "available",
    "backend_module",
    "parallel",
    "resolve",
    "round_to_grid",
    "row_spans",
]


@cache
def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@cache
def _module(name: str) -> ModuleType:
    if name == "torch":
        return reference
    if name == "numba":
        from . import numba_cpu

        return numba_cpu
    from . import triton_gpu

    return triton_gpu


def available(name: str) -> bool:
    """Whether backend ``name`` can be imported here (says nothing of the device)."""
    if name == "torch":
        return True
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if not _importable(name):
        return False
    try:
        _module(name)
    except Exception:  # a broken install (e.g. numba built for another numpy) falls back to torch
        return False
    return True


def resolve(tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend to use for ``tensor``: ``backend``, else ``$CDQ_KERNEL``, else automatic.

    Automatic: Triton on CUDA tensors, numba on CPU tensors, torch when those are missing. A
    backend asked for by name must be usable, or this raises (a forced backend never silently
    becomes another one).
    """
    choice = backend or os.environ.get(ENV) or "auto"
    if choice == "auto":
        if tensor.is_cuda and available("triton"):
            return "triton"
        if tensor.device.type == "cpu" and available("numba"):
            return "numba"
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (${ENV}): choose auto or one of {BACKENDS}")
    if not available(choice):
        raise RuntimeError(f"kernel backend {choice!r} was asked for but cannot be imported")
    if choice == "numba" and tensor.device.type != "cpu":
        raise RuntimeError("the numba kernel runs on CPU tensors only")
    if choice == "triton" and not _module("triton").usable(tensor):
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    return choice


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name``: ``block(Block)`` for every backend (per-row
    blocks for torch and triton only), ``row_sweep`` for numba."""
    return _module(name)


def row_spans(name: str, rows: int, columns: int) -> list[tuple[int, int]]:
    """Contiguous row ranges ``(lo, hi)`` a solver works on independently for backend ``name``:
    one per thread for numba (fewer on small layers, see :func:`threads.spans`), one otherwise."""
    return threads.spans(rows, columns) if name == "numba" else [(0, rows)]


def parallel(name: str, jobs):
    """Run independent ``jobs`` (one per row span, or any list) for backend ``name``: on the CPU
    threads with numba (:func:`threads.run`), one after another otherwise; results in order."""
    return threads.run(jobs) if name == "numba" else [job() for job in jobs]
