"""The adding problem (Hochreiter and Schmidhuber 1997; the uRNN protocol).

The input has ``length`` steps of 2 features: channel 0 uniform in [0, 1), channel 1 zero but
for two 1s, one in each half (``[0, length // 2)`` and ``[length // 2, length)``). The target is
the sum of the two marked numbers; the loss is the mean squared error. Predicting the constant
1 scores ``2 / 12 ≈ 0.167``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kru_core.tasks.base import Batch, Task, TaskInfo, eval_seed

CONSTANT_PREDICTOR_MSE = 1.0 / 6.0  # variance of the sum of two U(0, 1)


def adding_batch(batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs FloatTensor (B, length, 2), targets FloatTensor (B, 1))``.

    Example::

        >>> x, y = adding_batch(3, 10, torch.Generator().manual_seed(0))
        >>> torch.allclose((x[..., 0] * x[..., 1]).sum(1, keepdim=True), y)
        True
    """
    if length < 2:
        raise ValueError(f"expected length >= 2, got {length}")
    half = length // 2
    values = torch.rand(batch_size, length, generator=generator)
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, length, (batch_size,), generator=generator)
    markers = torch.zeros(batch_size, length)
    rows = torch.arange(batch_size)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values[rows, first] + values[rows, second]).unsqueeze(1)
    return torch.stack([values, markers], dim=-1), targets


class AddingTask(Task):
    """The adding problem; metric ``mse`` (the constant predictor scores about 0.167)."""

    primary_metric = "mse"

    def __init__(self, *, length: int, eval_size: int, seed: int = 0) -> None:
        super().__init__()
        self.length = length
        self.info = TaskInfo(
            task_kind="adding",
            target_kind="regression",
            input_kind="features",
            output_size=1,
            per_step=False,
            input_size=2,
            scalar_target=True,
            extra={"length": length, "constant_predictor_mse": CONSTANT_PREDICTOR_MSE},
        )
        generator = torch.Generator().manual_seed(eval_seed(seed))
        self._eval_sets["valid"] = Batch(*adding_batch(eval_size, length, generator))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return Batch(*adding_batch(batch_size, self.length, generator))
