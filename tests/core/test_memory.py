"""Freed memory kept during training (kru_core.memory): measured by the page faults of a
training-like loop of big allocations, in child processes (the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kru_core.memory import RETAIN_HEAP_ENV, has_glibc

REPO = Path(__file__).resolve().parents[2]
#: Elements of each big tensor of the loop: 100 MB of float32, 24,414 pages of 4 KiB.
ELEMENTS = 25_000_000
PAGES = ELEMENTS * 4 // 4096

#: The child: optionally a short training run or the setting itself, then 12 "steps" that
#: allocate and free three big tensors; prints each step's minor page faults and its RSS
#: before and after release_free_memory().
CHILD = """
import ctypes, json, resource, sys
# 4 KiB pages whatever the host's transparent huge pages setting (PR_SET_THP_DISABLE)
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
import torch
from kru_core import memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

setup, ELEMENTS = sys.argv[1], int(sys.argv[3])
if setup == "retain":
    applied = memory.retain_freed_memory()
elif setup == "train":
    from kru_core.config import JobConfig
    from kru_core.training import train
    cfg = JobConfig.from_dict({
        "task": {"kind": "copy", "delay": 3, "eval_size": 8},
        "model": {"cell": "kru", "hidden_size": 8},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2,
                  "device": "cpu"},
    })
    train(cfg, out_dir=sys.argv[2])
    applied = None
else:
    applied = None
per_step = []
for _ in range(12):
    before = faults()
    a = torch.ones(ELEMENTS)
    b = torch.ones(ELEMENTS)
    c = a + b
    del a, b, c
    per_step.append(faults() - before)
held = rss()
memory.release_free_memory()
print(json.dumps({"applied": applied, "faults": per_step, "held": held, "released": rss()}))
"""


def run_child(setup: str, *, retain: str = "1", tmp_path: Path | None = None) -> dict:
    env = {**os.environ, RETAIN_HEAP_ENV: retain}
    args = [sys.executable, "-c", CHILD, setup, str(tmp_path or ""), str(ELEMENTS)]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


needs_glibc = pytest.mark.skipif(not has_glibc(), reason="glibc only")


@needs_glibc
def test_kept_heap_stops_refaulting_pages_after_the_first_steps() -> None:
    kept = run_child("retain")
    default = run_child("none")
    assert kept["applied"] is True
    # glibc's default maps and unmaps each 100 MB block: every step faults all three in again
    assert all(f >= 2.9 * PAGES for f in default["faults"][1:]), default["faults"]
    # kept: after a few steps (glibc's small alignment fragments settle) no step faults
    assert sum(kept["faults"][6:]) < 0.05 * PAGES, kept["faults"]


@needs_glibc
def test_releasing_returns_the_kept_memory_to_the_os() -> None:
    kept = run_child("retain")
    assert kept["applied"] is True
    # three freed 100 MB blocks were held mapped, and release gives them back
    assert kept["held"] - kept["released"] > 2.5 * ELEMENTS * 4, kept


@needs_glibc
def test_the_setting_can_be_turned_off() -> None:
    off = run_child("retain", retain="0")
    assert off["applied"] is False
    assert all(f >= 2.9 * PAGES for f in off["faults"][1:]), off["faults"]


@needs_glibc
def test_a_training_run_keeps_freed_memory(tmp_path: Path) -> None:
    """What ``kru train`` and the worker run: after train(), the process keeps freed blocks."""
    after = run_child("train", tmp_path=tmp_path)
    assert sum(after["faults"][6:]) < 0.05 * PAGES, after["faults"]
