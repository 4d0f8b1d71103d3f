"""Row-parallel work on the CPU: the rows of a layer never interact in CD or GPTQ, so each thread
takes a contiguous range of rows through the whole column loop (GEMMs and in-block kernel).

Why not a parallel GEMM followed by a parallel kernel: torch's GEMMs and numba's parallel loops
each keep an OpenMP pool whose threads spin for milliseconds after every parallel region, and
alternating the two, block after block, made each pool's spinning threads take cores from the
other's work (the sweep's GEMMs ran 2–3× slower than the same GEMM alone, BENCHMARKS.md). Here
there is one pool: Python threads that sleep while idle, each running single-threaded torch ops
and nogil numba kernels on its own rows, and a barrier only where the caller needs one (the end of
a sweep). torch's own thread count is set to 1 while they run and restored afterwards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

# Entries (rows × columns) a thread gets at least: smaller problems run on one thread.
MIN_ENTRIES = 1 << 16

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_local = threading.local()  # .busy: this thread is running a job (jobs it starts run in line)


def spans(rows: int, columns: int, threads: int | None = None) -> list[tuple[int, int]]:
    """``range(rows)`` cut into one contiguous span per thread: ``threads`` (default torch's
    thread count), fewer when a thread would get under ``MIN_ENTRIES`` entries."""
    threads = torch.get_num_threads() if threads is None else threads
    count = max(1, min(threads, rows, rows * columns // MIN_ENTRIES))
    bounds = [rows * k // count for k in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _workers(count: int) -> ThreadPoolExecutor:
    """The pool of ``count`` worker threads (made again after a fork or to grow)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < count:
            _pool = (os.getpid(), count, ThreadPoolExecutor(count, thread_name_prefix="cdq-rows"))
        return _pool[2]


def _single_threaded(job: Callable[[], T]) -> T:
    torch.set_num_threads(1)  # this thread's BLAS too (torch sets MKL's count per thread)
    _local.busy = True
    try:
        return job()
    finally:
        _local.busy = False


def run(jobs: Sequence[Callable[[], T]]) -> list[T]:
    """Run ``jobs`` at once, one per thread (the first on the calling thread), with torch
    single-threaded meanwhile; return their results in order. One job, or jobs started from
    inside a job, run as plain calls. Every job finishes before this returns or raises (the first
    error is raised)."""
    if len(jobs) <= 1 or getattr(_local, "busy", False):
        return [job() for job in jobs]
    saved = torch.get_num_threads()
    pool = _workers(len(jobs) - 1)
    try:
        futures = [pool.submit(_single_threaded, job) for job in jobs[1:]]
        first: list[T] = []
        error: BaseException | None = None
        try:
            first.append(_single_threaded(jobs[0]))
        except BaseException as exc:  # wait for the others before raising: they share buffers
            error = exc
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return first + results
    finally:
        torch.set_num_threads(saved)
