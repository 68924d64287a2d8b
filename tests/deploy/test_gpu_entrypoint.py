"""docker/gpu-entrypoint.sh: each worker container on a node gets a GPU of its own.

The script runs as it does in the image, against a fake /dev with GPU device nodes and a lock
directory standing for the node-local ``kru-gpu-locks`` volume.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .specs import GPU_ENTRYPOINT

REPORT = 'echo "${CUDA_VISIBLE_DEVICES-unset}" > "$0"; exec sleep 30'


@pytest.fixture
def node(tmp_path: Path) -> dict[str, str]:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm", "nvidia-modeset"):
        (dev / name).touch()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "GPU_DEV_DIR": str(dev), "GPU_LOCK_DIR": str(tmp_path / "locks")}


def _start(env: dict[str, str], report: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(GPU_ENTRYPOINT), "sh", "-c", REPORT, str(report)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def test_each_worker_claims_a_different_gpu_until_none_is_left(node, tmp_path) -> None:
    workers = [_start(node, tmp_path / f"w{i}") for i in range(3)]
    try:
        claimed = sorted(_wait_for(tmp_path / f"w{i}") for i in range(3))
        assert claimed == ["0", "1", "2"]
        extra = subprocess.run(
            [str(GPU_ENTRYPOINT), "true"], env=node, capture_output=True, text=True, timeout=10
        )
        assert extra.returncode != 0
        assert "all 3 GPUs of this node are held by other workers" in extra.stderr
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_a_stopped_worker_frees_its_gpu(node, tmp_path) -> None:
    first = _start(node, tmp_path / "first")
    second = _start(node, tmp_path / "second")
    try:
        held = {_wait_for(tmp_path / "first"), _wait_for(tmp_path / "second")}
        first_gpu = (tmp_path / "first").read_text().strip()
        first.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock with the process
        first.wait()
        third = _start(node, tmp_path / "third")
        try:
            # the lowest free GPU: the one the killed worker held
            assert _wait_for(tmp_path / "third") == first_gpu
            assert held == {"0", "1"}
        finally:
            third.kill()
            third.wait()
    finally:
        second.kill()
        second.wait()


def test_without_gpus_or_with_an_explicit_choice_the_command_runs_as_is(node, tmp_path) -> None:
    no_gpu = {**node, "GPU_DEV_DIR": str(tmp_path / "no-such-dev")}
    out = subprocess.run(
        [str(GPU_ENTRYPOINT), "sh", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
        env=no_gpu,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "unset"
    chosen = subprocess.run(
        [str(GPU_ENTRYPOINT), "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
        env={**node, "CUDA_VISIBLE_DEVICES": "2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.strip() == "2"
    assert not (tmp_path / "locks").exists(), "an explicit choice claims nothing"


def test_the_command_replaces_the_script_and_keeps_its_arguments(node) -> None:
    # exec, not a child: SIGTERM from the container's init reaches `kru worker` itself.
    proc = subprocess.Popen(
        [str(GPU_ENTRYPOINT), "sh", "-c", 'echo "$$|$1|$2"', "sh", "a b", "c"],
        env=node,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out, _ = proc.communicate(timeout=10)
    assert out.strip() == f"{proc.pid}|a b|c"
