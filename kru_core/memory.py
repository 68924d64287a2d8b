"""Keeping freed memory in the process while a training run allocates the same big tensors
step after step.

A training step allocates and frees several tensors of shape (T, B, N): at pixel-MNIST's 784
steps, batch 32 and N=512 each complex one is 103 MB. glibc's ``malloc`` serves a block that big
with a fresh ``mmap`` and gives it back with ``munmap`` on ``free``, so the next step faults
every page in again (and the kernel zeroes it): on a 2-vCPU VM that is 25-40 ms per 100 MB,
more than the arithmetic. :func:`retain_freed_memory` makes glibc serve big blocks from the heap
and keep freed ones there, so later steps reuse pages that are already mapped;
:func:`release_free_memory` gives the free memory back to the OS (``malloc_trim``) at the end of
a run. Measured: ``docs/benchmarks.md``, "Freed memory kept during training".

The setting is process-wide and stays for the life of the process (glibc has no call that
restores its default, adaptive threshold), so :func:`kru_core.training.train` sets it when a run
starts and releases the free memory when the run ends. It does nothing off glibc, or with
``KRU_RETAIN_HEAP=0``.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = [
    "RETAIN_HEAP_ENV",
    "has_glibc",
    "heap_retention_available",
    "release_free_memory",
    "retain_freed_memory",
]

logger = logging.getLogger(__name__)

#: Set to ``0`` to leave glibc's allocator settings alone during training.
RETAIN_HEAP_ENV = "KRU_RETAIN_HEAP"

# mallopt(3) parameters (glibc's malloc/malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: The largest trim threshold mallopt takes (an ``int``): the heap's free top is kept up to it.
_KEEP_TRIM_THRESHOLD = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        for symbol in ("gnu_get_libc_version", "mallopt", "malloc_trim"):  # glibc only
            getattr(libc, symbol)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


_LIBC = _glibc()
_retained = False


def has_glibc() -> bool:
    """Whether this process's C library is glibc (whose allocator this module tunes)."""
    return _LIBC is not None


def heap_retention_available() -> bool:
    """Whether :func:`retain_freed_memory` changes anything here (glibc, and ``KRU_RETAIN_HEAP``
    not ``0``)."""
    return has_glibc() and os.environ.get(RETAIN_HEAP_ENV, "1").strip() != "0"


def retain_freed_memory() -> bool:
    """From now on glibc serves big blocks from the heap (no ``mmap``) and keeps the freed ones
    (no trimming below 2 GiB of free top), so that the next allocation of the same size reuses
    mapped pages. Idempotent; returns whether it applied (:func:`heap_retention_available`).

    Allocations by threads other than the main one can still be served by ``mmap`` (glibc's
    per-thread arenas); PyTorch's CPU autograd runs the backward in the calling thread, so a
    training loop's big tensors are covered when it runs in the main thread (as ``kru train``
    and the worker's solo pool run it)."""
    global _retained
    if not heap_retention_available():
        return False
    assert _LIBC is not None
    applied = bool(_LIBC.mallopt(_M_MMAP_MAX, 0))
    applied = bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)) and applied
    if not applied:
        logger.warning("glibc refused the heap settings (mallopt); freed memory is not kept")
    _retained = _retained or applied
    return applied


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS (``malloc_trim(0)``), once
    :func:`retain_freed_memory` has applied in this process (else nothing)."""
    if _LIBC is not None and _retained:
        _LIBC.malloc_trim(0)
