"""Memory: allocation failures named, and the C allocator kept from growing.

:func:`naming` turns an allocation that failed (CUDA's ``OutOfMemoryError``, the CPU allocator's
"can't allocate memory", Python's ``MemoryError``) into an :class:`OutOfMemory` that says what did
not fit; the driver adds the block, and the run keeps its resume journal (like a full disk), so
``--resume`` continues from the last finished block.

:func:`tune_allocator` and :func:`release` concern glibc's malloc, which serves CPU tensors: by
default a freed block of up to 32 MB goes back to a heap (an arena) rather than to the system, and
heaps are trimmed only from their top, so after many blocks of differently sized transients the
process keeps memory it no longer uses (the peak of a 24-block run drifted with allocation order,
not with the work: BENCHMARKS.md "Big models"). With a fixed mmap threshold every tensor of 1 MiB
or more is its own mapping, returned to the system when freed; :func:`release` hands back what
the heaps hold free after each block. Neither changes a computed value. Elsewhere than glibc both
do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

MMAP_THRESHOLD = 1 << 20  # tensors of at least this many bytes are mappings of their own
_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
_CPU_FAILURES = ("can't allocate memory", "not enough memory", "out of memory")


class OutOfMemory(MemoryError):
    """An allocation that did not fit, named (one line)."""


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (CUDA, the CPU allocator, or Python)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _CPU_FAILURES)


@contextmanager
def naming(what: str | Callable[[], str]) -> Iterator[None]:
    """Within the ``with``, a failed allocation becomes :class:`OutOfMemory` saying that ``what``
    (a description, or a function giving one) did not fit; one already named passes through."""
    try:
        yield
    except OutOfMemory:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        text = what() if callable(what) else what
        raise OutOfMemory(f"{text} did not fit ({_first_line(exc)})") from exc


def describe(tensor_name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> str:
    """``NAME (2048x8192 float32, 64.0 MiB)``."""
    count = 1
    for size in shape:
        count *= int(size)
    size = count * torch.empty(0, dtype=dtype).element_size()
    dims = "x".join(str(int(s)) for s in shape) or "scalar"
    return f"{tensor_name} ({dims} {str(dtype).removeprefix('torch.')}, {size / 2**20:.1f} MiB)"


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: other C libraries lack it)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (and the heap trim threshold with it);
    True when it was set. Called once, at the start of a command."""
    if _LIBC is None:
        return False
    ok = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return ok and _LIBC.mallopt(_M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD) == 1


def release() -> None:
    """Give the free pages of glibc's heaps back to the system (``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
