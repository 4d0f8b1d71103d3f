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

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")

# Entries (rows × columns) a span gets at least: smaller problems run on one thread.
MIN_ENTRIES = 1 << 16

_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool)
_local = threading.local()  # .busy: this thread is running a job (jobs it starts run in line)


def spans(rows: int, columns: int, threads: int | None = None) -> list[tuple[int, int]]:
    """``range(rows)`` cut into one contiguous span per thread (``threads``, default torch's
    thread count), fewer when a span would get under ``MIN_ENTRIES`` entries. (More, smaller
    spans did not help on a loaded machine: BENCHMARKS.md.)"""
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


def run(jobs: Sequence[Callable[[], T]], threads: int | None = None) -> list[T]:
    """Run ``jobs`` on ``threads`` threads (default torch's thread count; the calling thread is
    one of them), each taking the next job as it finishes one, with torch single-threaded
    meanwhile; return their results in order. One thread, or jobs started from inside a job, run
    them as plain calls. Every job started finishes before this returns or raises; after an error
    no new job starts, and the first error is raised."""
    saved = torch.get_num_threads()
    count = min(len(jobs), saved if threads is None else threads)
    if count <= 1 or getattr(_local, "busy", False):
        return [job() for job in jobs]
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    order = itertools.count()  # hands out job indices (one at a time under the GIL)

    def work() -> None:
        torch.set_num_threads(1)  # this thread's BLAS too (torch sets MKL's count per thread)
        _local.busy = True
        try:
            for index in order:
                if index >= len(jobs) or errors:
                    return
                try:
                    results[index] = jobs[index]()
                except BaseException as exc:
                    errors.append(exc)
                    return
        finally:
            _local.busy = False

    futures = [_workers(count - 1).submit(work) for _ in range(count - 1)]
    try:
        work()
        wait(futures)
    except BaseException as exc:  # (an interrupt while waiting) the workers stop after their job
        errors.append(exc)
        while not all(future.done() for future in futures):
            try:
                wait(futures)
            except BaseException:
                continue
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise errors[0]
    return results
