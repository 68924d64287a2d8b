"""The one home of the process helpers every test layer uses (tests/README.md).

``tests/`` is on ``sys.path`` for every test module (pytest's rootdir conftest), so any test or
helper module imports these as ``from testkit import free_port, wait_until, stop_process``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); fail the test after
    ``timeout`` seconds, naming ``what`` is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def stop_process(
    proc: subprocess.Popen, timeout: float = 30.0, *, fail: Callable[[], str] | None = None
) -> int:
    """SIGTERM ``proc`` (a graceful stop), wait up to ``timeout`` s, then SIGKILL it.

    Returns the exit status. With ``fail``, a process that had to be killed fails the test with
    ``fail()`` (e.g. the tail of its log) instead of returning.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        if fail is not None:
            pytest.fail(f"process {proc.pid} did not stop in {timeout:g} s:\n{fail()}")
        return proc.returncode


def copy_job(
    name: str | None = None,
    *,
    steps: int = 200,
    delay: int = 5,
    eval_size: int = 64,
    **train: object,
) -> dict:
    """The JSON of a tiny copy-task job (KRU, hidden 16, batch 16): seconds of CPU, learns the
    task in a few hundred steps. ``train``: more or other ``train`` fields."""
    body: dict = {
        "task": {"kind": "copy", "delay": delay, "eval_size": eval_size},
        "model": {"cell": "kru", "hidden_size": 16},
        "train": {
            "steps": steps,
            "batch_size": 16,
            "lr": 0.01,
            "eval_every": 50,
            "checkpoint_every": 50,
            "device": "cpu",
            **train,
        },
    }
    if name is not None:
        body["name"] = name
    return body
