"""A small KRU learns the copy and adding tasks on the CPU (docs/paper.md section 6).

The runs use the engine's default training settings (docs/results.md says how they were
chosen) and stop early once the held-out metric is past a margin; the final model is then
scored on a *fresh* test set drawn with another seed, which is what the assertions check.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kru_core.config import JobConfig
from kru_core.inference import LoadedModel
from kru_core.tasks import build_task
from kru_core.training import Progress, evaluate, train

pytestmark = pytest.mark.slow


class StopWhen:
    """``should_stop`` that fires after an evaluation reaching ``good(metrics)``."""

    def __init__(self, good: object) -> None:
        self.good = good
        self.reached = False
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_progress(self, p: Progress) -> None:
        if p.kind == "eval":
            self.history.append((p.step, p.metrics))
            self.reached = self.good(p.metrics)

    def __call__(self) -> bool:
        return self.reached


def fresh_test(run: Path, cfg: JobConfig, size: int) -> dict[str, float]:
    """The final model's metrics on ``size`` new examples (another seed than training's)."""
    model = LoadedModel.from_checkpoint(run).model
    test_cfg = cfg.replace(task={"eval_size": size})
    task = build_task(test_cfg.task, seed=cfg.train.seed + 12345)
    return evaluate(model, task)


def learn(tmp_path: Path, cfg: JobConfig, stop: StopWhen) -> tuple[float, object]:
    torch.set_num_threads(1)  # small matrices: a second thread only adds synchronisation
    started = time.monotonic()
    result = train(cfg, out_dir=tmp_path, on_progress=stop.on_progress, should_stop=stop)
    return time.monotonic() - started, result


def test_copy_delay_20(tmp_path: Path) -> None:
    cfg = JobConfig.from_dict(
        {
            "task": {"kind": "copy", "delay": 20, "eval_size": 256},
            "model": {"cell": "kru", "hidden_size": 64},
            "train": {"steps": 600, "eval_every": 50, "device": "cpu"},
        }
    )
    stop = StopWhen(lambda m: m["eval_accuracy"] >= 0.995)
    seconds, result = learn(tmp_path, cfg, stop)
    test = fresh_test(tmp_path, cfg, 1000)
    print(f"copy T=20: step {result.step}, {seconds:.0f} s, fresh test {test}")
    assert test["accuracy"] > 0.95, (test, stop.history)
    assert test["loss"] < 0.1 * test["memoryless_loss"]


def test_adding_length_50(tmp_path: Path) -> None:
    cfg = JobConfig.from_dict(
        {
            "task": {"kind": "adding", "length": 50, "eval_size": 512},
            "model": {"cell": "kru", "hidden_size": 32},
            "train": {"steps": 2000, "eval_every": 100, "device": "cpu"},
        }
    )
    stop = StopWhen(lambda m: m["eval_mse"] < 0.005)
    seconds, result = learn(tmp_path, cfg, stop)
    test = fresh_test(tmp_path, cfg, 2000)
    print(f"adding T=50: step {result.step}, {seconds:.0f} s, fresh test {test}")
    assert test["mse"] < 0.01, (test, stop.history)
