"""The checkpoint store: safetensors + JSON, atomic, pruned, never unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kru_core.checkpoint import (
    META_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    CheckpointStore,
    load_checkpoint,
)
from kru_core.config import JobConfig
from kru_core.errors import CheckpointError
from kru_core.tasks import CopyTask

CONFIG = JobConfig.from_dict({"task": {"kind": "copy", "delay": 3}, "train": {"steps": 10}})
INFO = CopyTask(delay=3, eval_size=1).info


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (self.factor @ self.factor.conj().T).real.sum()


def trained(optimizer_kind: str = "adam") -> tuple[Tiny, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Tiny()
    opt_cls = torch.optim.Adam if optimizer_kind == "adam" else torch.optim.RMSprop
    opt = opt_cls(
        [
            {"params": [model.factor], "lr": 0.1, "name": "factors"},
            {"params": model.linear.parameters(), "lr": 0.01, "name": "main"},
        ]
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("optimizer_kind", ["adam", "rmsprop"])
def test_save_load_round_trip(tmp_path: Path, optimizer_kind: str) -> None:
    model, opt = trained(optimizer_kind)
    store = CheckpointStore(tmp_path)
    rng = {"data": torch.Generator().manual_seed(5).get_state()}
    path = store.save(
        step=7,
        config=CONFIG,
        task_info=INFO,
        model=model,
        optimizer=opt,
        rng_state=rng,
        metrics={"eval_loss": 0.5, "eval_bad": float("nan")},
        parameter_counts={"total": 14, "recurrent": 8},
        meta={"elapsed_seconds": 1.5},
    )
    assert path == tmp_path / "step-000000007" and store.latest() == path
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [MODEL_FILE, TRAIN_STATE_FILE, META_FILE]
    )
    doc = json.loads((path / META_FILE).read_text())  # strict JSON: NaN became null
    assert doc["format"] == "kru-checkpoint" and doc["format_version"] == 1
    assert doc["config"] == CONFIG.to_dict() and doc["task"]["vocab_size"] == 10
    assert doc["metrics"] == {"eval_loss": 0.5, "eval_bad": None}

    ckpt = store.load()
    assert ckpt.step == 7 and ckpt.config == CONFIG and ckpt.task_info == INFO
    assert ckpt.meta["elapsed_seconds"] == 1.5 and ckpt.parameter_counts["recurrent"] == 8
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v) and ckpt.model_state[k].dtype == v.dtype
    assert torch.equal(ckpt.rng_state["data"], rng["data"])

    # the optimizer state restores exactly: one more step from both gives the same parameters
    model2 = Tiny()
    model2.load_state_dict(ckpt.model_state)
    opt_cls = type(opt)
    opt2 = opt_cls(
        [
            {"params": [model2.factor], "lr": 1.0, "name": "factors"},
            {"params": model2.linear.parameters(), "lr": 1.0, "name": "main"},
        ]
    )
    opt2.load_state_dict(ckpt.optimizer_state)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.01]
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_store_keeps_the_latest_few_and_replaces_same_step(tmp_path: Path) -> None:
    model, _ = trained()
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 3):
        store.save(step=step, config=CONFIG, task_info=INFO, model=model, metrics={"s": step})
    assert [p.name for p in store.checkpoints()] == ["step-000000002", "step-000000003"]
    assert not list(tmp_path.glob(".*"))  # no temporary or old directories left


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path: Path) -> None:
    model, _ = trained()
    store = CheckpointStore(tmp_path)
    store.save(step=1, config=CONFIG, task_info=INFO, model=model)
    (tmp_path / ".tmp-step-000000002-dead").mkdir()  # a writer died before its rename
    (tmp_path / "step-000000005").mkdir()  # no checkpoint.json: never completed
    assert store.latest() == tmp_path / "step-000000001"
    store.save(step=2, config=CONFIG, task_info=INFO, model=model)
    assert not (tmp_path / ".tmp-step-000000002-dead").exists()


def test_save_failure_leaves_nothing_half_written(tmp_path: Path) -> None:
    model, _ = trained()
    store = CheckpointStore(tmp_path)
    store.save(step=1, config=CONFIG, task_info=INFO, model=model)
    with pytest.raises(TypeError):  # not JSON serializable: fails after the tensors are written
        store.save(step=2, config=CONFIG, task_info=INFO, model=model, meta={"bad": object()})
    assert store.latest() == tmp_path / "step-000000001"
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001"]


def test_load_accepts_a_run_directory_and_rejects_garbage(tmp_path: Path) -> None:
    model, _ = trained()
    store = CheckpointStore(tmp_path / "run")
    store.save(step=4, config=CONFIG, task_info=INFO, model=model)
    assert load_checkpoint(tmp_path / "run").step == 4
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointStore(tmp_path / "empty").load()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    path = store.latest()
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)
    (path / META_FILE).write_text(json.dumps(meta))
    (path / MODEL_FILE).write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    model, opt = trained()
    store = CheckpointStore(tmp_path)
    store.save(
        step=1,
        config=CONFIG,
        task_info=INFO,
        model=model,
        optimizer=opt,
        rng_state={"data": torch.Generator().get_state()},
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert store.load().optimizer_state is not None
