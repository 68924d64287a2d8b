"""JSONL datasets and text files: kind inference, line-numbered errors, padding and masking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kru_core.config import TaskConfig
from kru_core.errors import DatasetError
from kru_core.tasks import (
    IGNORE_INDEX,
    build_task,
    inspect_dataset,
    inspect_text,
    load_dataset,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_token_classification(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"input": [3, 1, 4], "target": 1}, "", {"input": [5], "target": 2, "id": "x"}],
    )
    summary = inspect_dataset(path)
    assert summary["kind"] == "classification" and summary["examples"] == 2
    assert summary["input_kind"] == "tokens" and summary["vocab_size"] == 6
    assert summary["num_classes"] == 3 and summary["target_size"] is None
    assert summary["lengths"] == {"min": 1, "max": 3, "mean": 2.0}
    assert summary["bytes"] == path.stat().st_size


def test_feature_regression_scalar_and_vector(tmp_path: Path) -> None:
    scalar = write_jsonl(
        tmp_path / "s.jsonl",
        [{"input": [[0.5, 1], [2, 3]], "target": 1}, {"input": [[0, 0]], "target": 0.5}],
    )
    d = load_dataset(scalar)
    assert d.kind == "regression" and d.scalar_target and d.input_size == 2 and d.target_size == 1
    vector = write_jsonl(
        tmp_path / "v.jsonl",
        [{"input": [[1.0]], "target": [0.1, 0.2]}, {"input": [[1.0], [2.0]], "target": [1, 2]}],
    )
    d = load_dataset(vector)
    assert d.kind == "regression" and not d.scalar_target and d.target_size == 2
    assert d.targets[1].dtype == torch.float32


def test_sequence_labelling(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "l.jsonl",
        [{"input": [5, 9, 2, 6], "target": [0, 1, 1, 0]}, {"input": [1, 2], "target": [2, 0]}],
    )
    summary = inspect_dataset(path)
    assert summary["kind"] == "sequence_labelling" and summary["num_classes"] == 3


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"input": [1, 2], "target": 0}\n'  # 1 ok
        b'{"input": [1, 2], "target": 0\n'  # 2 invalid JSON
        b'{"input": [], "target": 1}\n'  # 3 empty input
        b'{"target": 1}\n'  # 4 missing input
        b'{"input": [1, -2], "target": 1}\n'  # 5 negative token
        b'{"input": [[0.5]], "target": 1}\n'  # 6 features among tokens
        b'{"input": [1], "target": "cat"}\n'  # 7 string target
        b'{"input": [1], "target": NaN}\n'  # 8 NaN
        b'{"input": [1], "target": 1e999}\n'  # 9 infinity
        b"\xff\xfe\n"  # 10 not UTF-8
        b"[1, 2]\n"  # 11 not an object
        b'{"input": [1, true], "target": 1}\n'  # 12 boolean token
        b'{"input": [3], "target": 2}\n'  # 13 ok
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    lines = [n for n, _ in info.value.errors]
    assert lines == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    messages = dict(info.value.errors)
    assert "invalid JSON" in messages[2]
    assert 'missing "input"' in messages[4]
    assert "input.1" in messages[5]
    assert "line 1" in messages[6]
    assert "finite" in messages[8] and "finite" in messages[9]
    assert "UTF-8" in messages[10]
    assert "line 2:" in str(info.value)


def test_inconsistent_lines_reported(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"input": [[1.0, 2.0]], "target": [0.5]},
            {"input": [[1.0, 2.0, 3.0]], "target": [0.5]},  # 2 feature size
            {"input": [[1.0, 2.0]], "target": [0.5, 1.0]},  # 3 target size
            {"input": [[1.0, 2.0]], "target": 0.5},  # 4 scalar among lists
            {"input": [[1.0, 2], [1]], "target": [0.5]},  # 5 ragged vectors
        ],
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert [n for n, _ in info.value.errors] == [2, 3, 4, 5]


def test_labelling_with_a_wrong_length_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "l.jsonl",
        [
            {"input": [1, 2, 3], "target": [0, 1, 0]},
            {"input": [1, 2], "target": [0, 1]},
            {"input": [1, 2], "target": [0, 1, 1]},
        ],
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert info.value.errors == [(3, "target: expected one label per input step (2), got 3")]


def test_float_target_makes_regression_not_half_classification(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl", [{"input": [1], "target": 1}, {"input": [2], "target": 2.5}]
    )
    assert load_dataset(path).kind == "regression"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(path)


def test_error_message_lists_at_most_20(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text("nope\n" * 30)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert len(info.value.errors) == 30 and "and 10 more" in str(info.value)


def test_dataset_task_pads_and_masks(tmp_path: Path) -> None:
    rows = [
        {"input": list(range(1, 2 + i % 5)), "target": [i % 2] * (1 + i % 5)} for i in range(40)
    ]
    path = write_jsonl(tmp_path / "lab.jsonl", rows)
    task = build_task(TaskConfig(kind="dataset", dataset_id="x", eval_size=4), dataset_path=path)
    assert task.info.per_step and task.info.output_size == 2 and task.eval_size() == 4
    batch = task.train_batch(16, torch.Generator().manual_seed(0))
    assert batch.lengths is not None
    for row in range(16):
        n = int(batch.lengths[row])
        assert (batch.targets[row, n:] == IGNORE_INDEX).all()
        assert (batch.targets[row, :n] != IGNORE_INDEX).all()
        assert (batch.inputs[row, n:] == 0).all()
    # the loss ignores the padded steps: garbage there changes nothing
    logits = torch.randn(*batch.targets.shape, 2)
    noisy = logits.clone()
    pad = batch.targets == IGNORE_INDEX
    noisy[pad] = 1e4
    assert torch.equal(task.loss(logits, batch), task.loss(noisy, batch))
    sums = task.metric_sums(noisy, batch)
    assert sums["accuracy"][1] == int(batch.lengths.sum())


def test_dataset_task_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    rows = [{"input": [i], "target": i % 3} for i in range(50)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = TaskConfig(kind="dataset", dataset_id="x", eval_size=100)
    a = build_task(cfg, dataset_path=path, seed=1)
    b = build_task(cfg, dataset_path=path, seed=1)
    ea = next(a.eval_batches(100))
    assert torch.equal(ea.inputs, next(b.eval_batches(100)).inputs)
    assert a.eval_size() == 5  # a tenth of 50
    held_out = set(ea.inputs[:, 0].tolist())
    seen = set(a.train_batch(500, torch.Generator().manual_seed(0)).inputs[:, 0].tolist())
    assert not held_out & seen


def test_single_example_dataset(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"input": [[1.0]], "target": 0.5}])
    task = build_task(TaskConfig(kind="dataset", dataset_id="x"), dataset_path=path)
    assert task.eval_size() == 1 and len(task.train_batch(3, torch.Generator())) == 3


def test_missing_dataset_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        build_task(TaskConfig(kind="dataset", dataset_id="x"), dataset_path=tmp_path / "no")


# -- text ------------------------------------------------------------------------------------


def test_text_task_windows_and_vocabulary(tmp_path: Path) -> None:
    text = "hello world, " * 30
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    summary = inspect_text(path)
    assert summary["vocab_size"] == len(set(text)) and summary["characters"] == len(text)
    assert summary["vocabulary"] == sorted(set(text)) and summary["lines"] == 1
    task = build_task(
        TaskConfig(kind="text", dataset_id="t", seq_len=10, eval_size=3), dataset_path=path
    )
    vocab = task.info.vocabulary
    batch = task.train_batch(4, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == batch.targets.shape == (4, 10)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets: the next character
    decoded = "".join(vocab[i] for i in [*batch.inputs[0].tolist(), int(batch.targets[0, -1])])
    assert decoded in text
    assert task.eval_size() == 3
    uniform = torch.zeros(3, 10, len(vocab))
    metrics = task.finish_metrics(task.metric_sums(uniform, next(task.eval_batches(3))))
    assert metrics["bpc"] == pytest.approx(math.log2(len(vocab)), rel=1e-5)


def test_text_errors_name_the_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nbad \xff here\nfine\n\xc3\n")
    with pytest.raises(DatasetError) as info:
        inspect_text(path)
    assert [n for n, _ in info.value.errors] == [2, 4]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        inspect_text(empty)


def test_text_too_short_for_seq_len(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("abc" * 10)
    with pytest.raises(DatasetError, match="seq_len=100"):
        build_task(TaskConfig(kind="text", dataset_id="t", seq_len=100), dataset_path=path)
