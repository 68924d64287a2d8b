"""Fixtures of the library tests (tests/README.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test (use with ``pytest.mark.usefixtures``).

    The layer tests' tensors are tiny: more threads only add OpenMP barrier waits, which become
    very slow when the 2 CPUs are shared with other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
