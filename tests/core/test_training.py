"""The training engine: optimizer groups, resume, cooperative stop, limits, errors, datasets."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kru_core.checkpoint import CheckpointStore
from kru_core.config import JobConfig
from kru_core.errors import TrainingError
from kru_core.models import SequenceModel, build_model, resolve_activation
from kru_core.tasks import CopyTask, TaskInfo
from kru_core.training import (
    Progress,
    build_optimizer,
    learning_rates,
    train,
)

torch.set_num_threads(1)


def tiny(**train: object) -> JobConfig:
    """A copy run small enough for a unit test (N=8: three complex 2x2 factors)."""
    return JobConfig.from_dict(
        {
            "task": {"kind": "copy", "delay": 3, "eval_size": 16},
            "model": {"cell": "kru", "hidden_size": 8},
            "train": {
                "steps": 6,
                "batch_size": 4,
                "eval_every": 3,
                "checkpoint_every": 3,
                "device": "cpu",
                **train,
            },
        }
    )


def parameters(path: Path) -> dict[str, torch.Tensor]:
    return CheckpointStore(path).load().model_state


@pytest.mark.parametrize("cell", ["kru", "kru_lstm", "rnn", "lstm"])
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_each_parameter_in_exactly_one_group(cell: str, optimizer: str) -> None:
    cfg = tiny(optimizer=optimizer, lr=0.01, factor_lr=0.05).replace(model={"cell": cell})
    model = build_model(cfg.model, CopyTask(delay=3, eval_size=1).info)
    opt = build_optimizer(model, cfg.train)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(ids) == len(set(ids))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["main"]["lr"] == 0.01
    factors = {id(p) for p in model.factor_parameters()}
    if factors:
        assert {id(p) for p in by_name["factors"]["params"]} == factors
        assert by_name["factors"]["lr"] == 0.05
    assert type(opt).__name__.lower() == optimizer


def test_auto_activation_is_the_measured_choice() -> None:
    from kru_core.tasks import AddingTask

    copy_info = CopyTask(delay=3, eval_size=1).info
    adding_info = AddingTask(length=4, eval_size=1).info
    auto = tiny().model
    assert auto.activation == "auto"
    assert resolve_activation(auto, copy_info) == "modrelu"
    assert resolve_activation(auto, adding_info) == "split_relu"
    explicit = tiny().replace(model={"activation": "modrelu"}).model
    assert resolve_activation(explicit, adding_info) == "modrelu"
    assert build_model(auto, adding_info).rnn.activation == "split_relu"


def test_learning_rate_schedules() -> None:
    const = tiny(steps=100, lr=0.01, factor_lr=0.1, lr_schedule="constant")
    assert learning_rates(const.train, 0) == learning_rates(const.train, 99)
    assert learning_rates(const.train, 50) == {"main": 0.01, "factors": 0.1}
    cos = tiny(steps=100, lr=0.01, lr_schedule="cosine")
    assert learning_rates(cos.train, 0) == {"main": 0.01, "factors": 0.01}
    assert learning_rates(cos.train, 50)["main"] == pytest.approx(0.005)
    last = 0.01 * 0.5 * (1 + math.cos(math.pi * 0.99))
    assert learning_rates(cos.train, 99)["main"] == pytest.approx(last)


def test_factor_rate_scales_down_beyond_100_steps() -> None:
    cfg = tiny(steps=100, lr=0.01, lr_schedule="constant").train
    assert learning_rates(cfg, 0, 784) == {"main": 0.01, "factors": pytest.approx(0.01 / 7.84)}
    assert learning_rates(cfg, 0, 100) == learning_rates(cfg, 0, 40) == learning_rates(cfg, 0)
    assert learning_rates(cfg, 0, 40)["factors"] == 0.01
    explicit = tiny(steps=100, lr=0.01, factor_lr=0.002, lr_schedule="constant").train
    assert learning_rates(explicit, 0, 784)["factors"] == 0.002


def test_engine_gives_the_factors_the_length_scaled_rate(tmp_path: Path) -> None:
    def first_step(cfg: JobConfig, out: Path) -> dict[str, float]:
        events: list[Progress] = []
        train(cfg, out_dir=out, on_progress=events.append)
        return next(e.metrics for e in events if e.kind == "train")

    copy = first_step(tiny(steps=1).replace(task={"delay": 230}), tmp_path / "kru")
    assert copy["lr"] == 0.003 and copy["factor_lr"] == pytest.approx(0.003 * 100 / 250)
    assert "factor_lr" not in first_step(tiny(steps=1).replace(model={"cell": "lstm"}), tmp_path)


def test_run_reports_progress_and_saves(tmp_path: Path) -> None:
    events: list[Progress] = []
    result = train(tiny(), out_dir=tmp_path, on_progress=events.append)
    assert result.status == "completed" and result.step == 6
    assert result.checkpoint == tmp_path / "step-000000006"
    assert result.parameter_counts["recurrent"] == 3 * 8  # three complex 2x2 factors
    kinds = [(e.kind, e.step) for e in events if e.kind != "train"]
    assert kinds == [("eval", 3), ("checkpoint", 3), ("eval", 6), ("checkpoint", 6)]
    train_steps = [e.step for e in events if e.kind == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert {"loss", "penalty", "lr"} <= set(events[0].metrics)
    assert {"eval_loss", "eval_accuracy", "eval_memoryless_loss"} <= set(result.metrics)
    saved = json.loads((result.checkpoint / "checkpoint.json").read_text())
    assert saved["metrics"] == result.metrics and saved["step"] == 6


def test_resume_is_bit_for_bit(tmp_path: Path) -> None:
    """Stopped after step 3 and resumed = uninterrupted: same batches, same optimizer state."""
    cfg = tiny(
        steps=7, optimizer="adam", clip_grad_norm=1.0, unitary_penalty=0.1, lr_schedule="cosine"
    )
    straight = train(cfg, out_dir=tmp_path / "a")
    assert straight.status == "completed" and straight.step == 7
    calls = {"n": 0}

    def stop_at_3() -> bool:
        calls["n"] += 1
        return calls["n"] == 4  # checked before each step: after 3 steps

    first = train(cfg, out_dir=tmp_path / "b", should_stop=stop_at_3)
    assert first.status == "stopped" and first.step == 3
    resumed = train(cfg, out_dir=tmp_path / "b")
    assert resumed.status == "completed" and resumed.step == 7
    a, b = parameters(tmp_path / "a"), parameters(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the runs did train: the parameters moved from their initial values
    fresh = build_model(cfg.model, CopyTask(delay=3, eval_size=1).info)
    assert not all(torch.equal(fresh.state_dict()[k], a[k]) for k in a)


def test_should_stop_ends_within_one_step_with_a_checkpoint(tmp_path: Path) -> None:
    steps: list[int] = []
    flag = {"stop": False}

    def on_progress(p: Progress) -> None:
        if p.kind == "train":
            steps.append(p.step)
            flag["stop"] = p.step == 2

    result = train(
        tiny(steps=100), out_dir=tmp_path, on_progress=on_progress, should_stop=lambda: flag["stop"]
    )
    assert result.status == "stopped" and result.step == 2 and steps == [1, 2]
    assert CheckpointStore(tmp_path).latest() == tmp_path / "step-000000002"


def test_max_seconds_times_out_with_checkpoint_and_metrics(tmp_path: Path) -> None:
    result = train(tiny(steps=10_000, max_seconds=1.0), out_dir=tmp_path)
    assert result.status == "timeout" and 0 < result.step < 10_000
    assert "eval_accuracy" in result.metrics
    assert result.checkpoint == CheckpointStore(tmp_path).latest()


@pytest.mark.parametrize("stop", ["timeout", "stopped"])
def test_an_exit_right_after_an_eval_step_does_not_repeat_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """The time limit (or a stop) reached just after step 6's evaluation and checkpoint: neither
    is done a second time at step 6 (a fault test found such a twin eval point in a job's
    metrics)."""
    from kru_core import training

    if stop == "timeout":
        monkeypatch.setattr(training._Run, "elapsed", lambda self: 1e9 * (self.step >= 6))
    seen: list[tuple[str, int]] = []
    evals: list[dict[str, float]] = []

    def on_progress(p: Progress) -> None:
        seen.append((p.kind, p.step))
        if p.kind == "eval":
            evals.append(p.metrics)

    result = train(
        tiny(steps=100, max_seconds=60.0),
        out_dir=tmp_path,
        on_progress=on_progress,
        should_stop=(lambda: seen[-1:] == [("checkpoint", 6)]) if stop == "stopped" else None,
    )
    assert result.status == stop and result.step == 6
    assert seen.count(("eval", 6)) == 1 and seen.count(("checkpoint", 6)) == 1, seen
    assert result.checkpoint == CheckpointStore(tmp_path).latest() == tmp_path / "step-000000006"
    assert result.metrics == evals[-1] and "eval_accuracy" in result.metrics


def spoil_loss_at_call(
    monkeypatch: pytest.MonkeyPatch, call: int, spoil: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Make the copy task's ``call``-th loss evaluation return ``spoil(loss)``."""
    original = CopyTask.loss
    calls = {"n": 0}

    def loss(self: CopyTask, outputs: torch.Tensor, batch: object) -> torch.Tensor:
        calls["n"] += 1
        value = original(self, outputs, batch)
        return spoil(value) if calls["n"] == call else value

    monkeypatch.setattr(CopyTask, "loss", loss)


def test_nan_loss_raises_and_keeps_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoil_loss_at_call(monkeypatch, 5, lambda value: value * float("nan"))
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*train\.lr \(now 0\.003\)"):
        train(tiny(steps=10, checkpoint_every=2), out_dir=tmp_path)
    assert CheckpointStore(tmp_path).latest() == tmp_path / "step-000000004"


class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


def test_infinite_gradient_raises_before_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoil_loss_at_call(monkeypatch, 3, _InfiniteGradient.apply)
    with pytest.raises(TrainingError, match=r"gradient norm became (inf|nan) at step 3"):
        train(tiny(steps=10, checkpoint_every=2), out_dir=tmp_path)
    saved = CheckpointStore(tmp_path).load()
    assert saved.step == 2
    assert all(torch.isfinite(v).all() for v in saved.model_state.values())


def test_every_update_is_projected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each optimizer step is followed by the model's projection (modReLU bias to b <= 0)."""
    calls: list[float] = []
    original = SequenceModel.constrain_

    def constrain(self: SequenceModel) -> None:
        with torch.no_grad():
            self.rnn.bias.add_(1.0)  # as if the update had pushed every bias above 0
        original(self)
        calls.append(float(self.rnn.bias.max()))

    monkeypatch.setattr(SequenceModel, "constrain_", constrain)
    train(tiny(steps=6), out_dir=tmp_path)
    assert len(calls) == 6 and max(calls) == 0.0
    assert (parameters(tmp_path)["rnn.bias"] <= 0).all()


def test_resume_refuses_another_run(tmp_path: Path) -> None:
    train(tiny(steps=3), out_dir=tmp_path)
    with pytest.raises(TrainingError, match="another run"):
        train(tiny(steps=3).replace(model={"hidden_size": 4}), out_dir=tmp_path)
    again = train(tiny(steps=3), out_dir=tmp_path)  # already complete: returns at once
    assert again.status == "completed" and again.step == 3 and "eval_loss" in again.metrics
    fresh = train(tiny(steps=2), out_dir=tmp_path / "x", resume=False)
    assert fresh.step == 2


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["classification", "regression", "labelling", "features"])
def test_dataset_tasks_train(tmp_path: Path, kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(30):
        n = 1 + i % 6
        tokens = torch.randint(0, 5, (n,), generator=g).tolist()
        if kind == "classification":
            rows.append({"input": tokens, "target": tokens[-1] % 3})
        elif kind == "regression":
            rows.append({"input": tokens, "target": [float(sum(tokens)), 0.5]})
        elif kind == "labelling":
            rows.append({"input": tokens, "target": [t % 2 for t in tokens]})
        else:
            rows.append({"input": [[t / 5, 1.0] for t in tokens], "target": float(n)})
    path = write(tmp_path / "d.jsonl", rows)
    cfg = tiny(steps=4, eval_every=2).replace(task={"kind": "dataset", "dataset_id": "d"})
    result = train(cfg, out_dir=tmp_path / "run", dataset_path=path)
    assert result.status == "completed"
    metric = "eval_mse" if kind in ("regression", "features") else "eval_accuracy"
    assert metric in result.metrics


def test_text_task_trains(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    cfg = tiny(steps=3).replace(task={"kind": "text", "dataset_id": "t", "seq_len": 16})
    result = train(cfg, out_dir=tmp_path / "run", dataset_path=path)
    assert result.metrics["eval_bpc"] > 0
    info = CheckpointStore(tmp_path / "run").load().task_info
    assert isinstance(info, TaskInfo) and info.vocabulary == sorted(set(path.read_text()))
