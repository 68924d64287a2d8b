"""The predictor's model cache: LRU order, one load per model under concurrency, unknown ids."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from app.predictor import ModelCache
from kru_core.config import JobConfig
from kru_core.inference import LoadedModel
from kru_core.training import train
from worker.errors import NotFound


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real (one-step) copy-task checkpoints."""
    config = JobConfig.from_dict(
        {
            "task": {"kind": "copy", "delay": 2, "eval_size": 4},
            "model": {"cell": "kru", "hidden_size": 4},
            "train": {"steps": 1, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1},
        }
    )
    root = tmp_path_factory.mktemp("checkpoints")
    for name in "abc":
        train(config, out_dir=root / name)
    return {name: root / name for name in "abc"}


class CountingLoader:
    def __init__(self) -> None:
        self.loads: Counter[Path] = Counter()
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> LoadedModel:
        with self._lock:
            self.loads[path] += 1
        return LoadedModel.from_checkpoint(path)


def resolver(checkpoints: dict[str, Path]):
    def resolve(model_id: str) -> Path:
        if model_id not in checkpoints:
            raise NotFound(f"model {model_id!r} not found")
        return checkpoints[model_id]

    return resolve


def test_least_recently_used_is_dropped(checkpoints: dict[str, Path]) -> None:
    loader = CountingLoader()
    cache = ModelCache(2, resolve=resolver(checkpoints), loader=loader)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # a hit, and now the most recent
    cache.get("c")  # evicts b
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    cache.get("b")
    assert loader.loads == {checkpoints["a"]: 1, checkpoints["b"]: 2, checkpoints["c"]: 1}


def test_concurrent_misses_load_once(checkpoints: dict[str, Path]) -> None:
    loader = CountingLoader()
    cache = ModelCache(2, resolve=resolver(checkpoints), loader=loader)
    results: list[LoadedModel] = []
    barrier = threading.Barrier(8)

    def get() -> None:
        barrier.wait()
        results.append(cache.get("a"))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.loads[checkpoints["a"]] == 1
    assert len(results) == 8 and all(r is results[0] for r in results)


def test_unknown_id_raises_and_caches_nothing(checkpoints: dict[str, Path]) -> None:
    cache = ModelCache(2, resolve=resolver(checkpoints), loader=CountingLoader())
    with pytest.raises(NotFound):
        cache.get("zzz")
    assert len(cache) == 0
    assert cache.get("a") is cache.get("a")


def test_capacity_must_be_positive(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="capacity"):
        ModelCache(0, resolve=resolver(checkpoints))
