"""Layers solved in bands of rows, and the work on Σ alone done once for all of a layer's bands.

Rows never interact in ``tr((W − Ŵ) Σ (W − Ŵ)ᵀ)``, so a method that declares ``row_bands``
(:class:`cdq_cli.solvers.registry.Method`: cdq, GPTQ) may solve a layer's rows in bands, and
several ranks may share one large layer's bands. A band's result is not bit for bit those rows
of a whole-layer solve (matrix products of a band and of the whole layer may round a row
differently, since BLAS and cuBLAS pick their kernels by shape; and cdq's stopping and refit
choices are its whole problem's), so every run solves a layer in the same bands, :func:`row_bands`
of its shape and device kind, whether one process solves them all or several ranks share them:
that is what keeps one process's bytes.

What depends on Σ alone (the GPTQ starts' factorization of Σ, the sweeps' permuted Σ, ``-o
target=fp``'s factor) would be repeated by every band; inside :func:`shared` it is made once per
layer (:func:`once`). A method that solves in phases (cdq: each start, then the sweeps; a
generator that pauses between them, :func:`finish` runs one to its end) has a layer's bands run
in :func:`lockstep`: every band's first phase, then every band's second, and so on, with what the
finished phase made on Σ dropped before the next begins, so that at most one phase's Σ-sized work
is held at a time (a wide layer's factors are each as large as its Σ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

# Rows per band: on a CPU a band's products stay large enough to run at GEMM speed and its fixed
# costs small (a layer of SmolLM2, 576 or 1536 rows, gives 2 or 3 bands for the ranks to share);
# on a GPU bands are larger so that every kernel launch stays wide.
BAND_ROWS = {"cpu": 256, "cuda": 4096}
_ALIGN = 8  # band edges on multiples of this

T = TypeVar("T")


def row_bands(rows: int, device: str | torch.device) -> list[tuple[int, int]]:
    """The bands ``[(lo, hi), ...]`` a layer of ``rows`` output rows is solved in on a device of
    this kind: as few as :data:`BAND_ROWS` allows, of equal size rounded up to a multiple of 8."""
    most = BAND_ROWS.get(torch.device(device).type, BAND_ROWS["cuda"])
    return even_bands(rows, max(1, math.ceil(rows / most)))


def even_bands(rows: int, count: int) -> list[tuple[int, int]]:
    """``rows`` cut into ``count`` bands of equal size rounded up to a multiple of 8 (the last one
    shorter; fewer bands when the rounding leaves none for the last)."""
    step = math.ceil(rows / count / _ALIGN) * _ALIGN
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


class _Shared:
    def __init__(self, sigma: torch.Tensor) -> None:
        self.sigma = sigma
        self.entries: dict[Hashable, tuple[torch.Tensor, Any]] = {}


_SHARED: ContextVar[_Shared | None] = ContextVar("cdq_shared_sigma_work", default=None)


@contextmanager
def shared(sigma: torch.Tensor) -> Iterator[None]:
    """Inside, :func:`once` keeps what it computes on this Σ (the same tensor object) until the
    block ends; nothing is kept after it. Inside a block on the same Σ it adds nothing."""
    found = _SHARED.get()
    if found is not None and found.sigma is sigma:
        yield
        return
    token = _SHARED.set(_Shared(sigma))
    try:
        yield
    finally:
        _SHARED.reset(token)


def once(sigma: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or what it returned earlier for ``key`` inside the same :func:`shared` block
    on this same Σ with the same diagonal (the only in-place change cdq makes to a Σ is to its
    diagonal, for a moment: :func:`cdq_cli.solvers.cdq.solve_cdq`'s ``shrink``)."""
    found = _SHARED.get()
    if found is None or found.sigma is not sigma:
        return compute()
    diagonal = sigma.diagonal()
    entry = found.entries.get(key)
    if entry is not None and torch.equal(entry[0], diagonal):
        return entry[1]
    value = compute()
    found.entries[key] = (diagonal.clone(), value)
    return value


def release() -> None:
    """Drop what :func:`once` kept in the current :func:`shared` block (nothing outside one)."""
    found = _SHARED.get()
    if found is not None:
        found.entries.clear()


def finish(phases: Generator[Any, None, T]) -> T:
    """Run a solve in phases to its end (its pauses do nothing) and return its result."""
    while True:
        try:
            next(phases)
        except StopIteration as stop:
            return stop.value


def lockstep(solves: list[Generator[Any, None, T]]) -> list[T]:
    """Run solves in phases side by side, phase by phase, and return their results in order.

    Every solve's phase k runs before any solve's phase k + 1, and between phases :func:`release`
    drops the Σ-only work the finished phase made (the caller's :func:`shared` block keeps one
    layer's). Each solve computes exactly what it computes alone (:func:`finish`): the same bits,
    in a different order of the bands' work. Solves that end early just stop taking part."""
    results: list[Any] = [None] * len(solves)
    running = list(enumerate(solves))
    while running:
        paused = []
        for index, solve in running:
            try:
                next(solve)
            except StopIteration as stop:
                results[index] = stop.value
            else:
                paused.append((index, solve))
        if paused:
            release()
        running = paused
    return results
