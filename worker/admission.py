"""Admission by cost: a job is refused at submit when it cannot fit the worker.

:func:`check` estimates the job's training memory and time (:mod:`kru_core.cost`) and raises
:class:`~worker.errors.Invalid` (422) naming the field to change when

* a Kronecker factor has a side above :data:`kru_core.config.MAX_FACTOR_SIZE` (explicit factors
  are refused by the config itself; this catches the default factorization of a hidden size
  with a large prime factor) unless ``model.allow_dense_factors``;
* the memory is above :func:`job_memory_budget` (``KRU_MAX_JOB_MEMORY_BYTES``; 0: the device's
  memory, or half the host's): field ``train.batch_size`` when activations dominate, else
  ``model.hidden_size``;
* the time at ``KRU_WORKER_FLOPS`` is above ``KRU_MAX_JOB_SECONDS``: field ``train.steps``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
from collections.abc import Iterator
from typing import Any

from kru_core.config import MAX_FACTOR_SIZE, JobConfig, dense_factor_message
from kru_core.cost import CostEstimate, estimate, factor_shapes, task_shape
from worker.errors import Invalid
from worker.settings import Settings


@functools.cache
def _device_memory() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # no usable CUDA: the host's memory decides
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def job_memory_budget(settings: Settings) -> int:
    """Bytes one job may use: ``KRU_MAX_JOB_MEMORY_BYTES``, or (0) the memory of this
    process's CUDA device 0, or half the host's memory without one."""
    return settings.max_job_memory_bytes or _device_memory()


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check(settings: Settings, config: JobConfig, summary: dict[str, Any] | None) -> CostEstimate:
    """Refuse (``Invalid``) a job that cannot fit; return its estimate.

    ``summary`` is the uploaded dataset's summary (``dataset`` and ``text`` tasks).
    """
    model = config.model
    kronecker = model.cell in ("kru", "kru_lstm")
    if kronecker and model.factors is None and not model.allow_dense_factors:
        shapes = factor_shapes(model.hidden_size, None)
        big = [s for s in shapes if max(s) > MAX_FACTOR_SIZE]
        if big:
            raise Invalid(
                "model.hidden_size",
                f"hidden size {model.hidden_size} factors into {[p for p, _ in shapes]}: "
                + dense_factor_message(big[0][0])
                + "; or choose a hidden size with smaller prime factors",
            )
    cost = estimate(config, task_shape(config.task, summary))
    budget = job_memory_budget(settings)
    if cost.memory_bytes > budget:
        heavy = cost.activation_bytes > cost.memory_bytes / 2
        field = "train.batch_size" if heavy else "model.hidden_size"
        what = "activations for backpropagation" if heavy else "parameters and optimizer state"
        raise Invalid(
            field,
            f"the job needs about {_gib(cost.memory_bytes)} to train (mostly {what}); a "
            f"worker admits {_gib(budget)} (KRU_MAX_JOB_MEMORY_BYTES)",
        )
    seconds = cost.seconds(settings.worker_flops)
    if seconds > settings.max_job_seconds:
        per_step = seconds / max(1, config.train.steps)
        most = int(settings.max_job_seconds / per_step) if per_step > 0 else 0
        raise Invalid(
            "train.steps",
            f"the job needs about {seconds:.3g} s of a worker ({cost.flops_per_step:.3g} flop a "
            f"step at KRU_WORKER_FLOPS {settings.worker_flops:.3g}/s), more than "
            f"KRU_MAX_JOB_SECONDS ({settings.max_job_seconds:g} s): at most about {most} steps",
        )
    return cost


def _address_space() -> int:
    """This process's virtual memory size in bytes (``VmSize`` of ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def memory_limit(limit_bytes: int) -> Iterator[int | None]:
    """Limit this process's address space to what it uses now plus ``limit_bytes`` while the
    block runs (``RLIMIT_AS``, soft limit; restored after), yielding the limit set.

    Jobs run in the worker's main process (``--pool solo``), so this bounds the job, not the
    host: an allocation past it fails (``MemoryError``, or PyTorch's ``can't allocate memory``)
    and the job ends ``failed`` while the worker lives on. Only for CPU jobs: CUDA reserves
    far more address space than it uses. Yields None (no limit) where rlimits are unavailable.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        wanted = _address_space() + limit_bytes
    except (OSError, ValueError):
        yield None
        return
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY:
        wanted = min(wanted, soft)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))
    try:
        yield wanted
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory or failed allocation (CPU or CUDA)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate"))
