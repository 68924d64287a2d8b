"""Copy memory (Arjovsky et al. 2016): recall 10 symbols after ``delay`` steps.

Alphabet 0..9: 0 is the blank, 1..8 are data, 9 is the delimiter. The input is 10 data symbols,
``delay - 1`` blanks, the delimiter and 10 blanks (``delay + 20`` steps); the target is
``delay + 10`` blanks followed by the 10 data symbols. A model that outputs blanks until the
delimiter and then guesses uniformly among the 8 data symbols scores the memoryless
cross-entropy ``10 ln 8 / (delay + 20)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kru_core.tasks.base import Batch, Task, TaskInfo, eval_seed

BLANK = 0
DELIMITER = 9
N_SYMBOLS = 10  # input alphabet
N_OUTPUTS = 9  # the targets are blanks or data symbols, never the delimiter
N_RECALL = 10  # data symbols to remember


def memoryless_loss(delay: int) -> float:
    """Cross-entropy of the best model without memory: ``10 ln 8 / (delay + 20)``."""
    return N_RECALL * math.log(8) / (delay + 2 * N_RECALL)


def copy_batch(batch_size: int, delay: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, both ``LongTensor (batch_size, delay + 20)``.

    Example::

        >>> x, y = copy_batch(2, 5, torch.Generator().manual_seed(0))
        >>> x.shape, int(x[0, 5 + 9]), bool((y[:, 15:] == x[:, :10]).all())
        (torch.Size([2, 25]), 9, True)
    """
    if delay < 1:
        raise ValueError(f"expected delay >= 1, got {delay}")
    steps = delay + 2 * N_RECALL
    data = torch.randint(1, 9, (batch_size, N_RECALL), generator=generator)
    inputs = torch.full((batch_size, steps), BLANK, dtype=torch.long)
    inputs[:, :N_RECALL] = data
    inputs[:, delay + N_RECALL - 1] = DELIMITER
    targets = torch.full((batch_size, steps), BLANK, dtype=torch.long)
    targets[:, delay + N_RECALL :] = data
    return inputs, targets


class CopyTask(Task):
    """The copy memory task; ``accuracy`` is measured on the 10 recalled symbols only."""

    primary_metric = "accuracy"

    def __init__(self, *, delay: int, eval_size: int, seed: int = 0) -> None:
        super().__init__()
        self.delay = delay
        self.info = TaskInfo(
            task_kind="copy",
            target_kind="classification",
            input_kind="tokens",
            output_size=N_OUTPUTS,
            per_step=True,
            vocab_size=N_SYMBOLS,
            extra={"delay": delay, "memoryless_loss": memoryless_loss(delay)},
        )
        generator = torch.Generator().manual_seed(eval_seed(seed))
        self._eval_sets["valid"] = Batch(*copy_batch(eval_size, delay, generator))

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return Batch(*copy_batch(batch_size, self.delay, generator))

    def metric_sums(self, outputs: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        sums = super().metric_sums(outputs, batch)
        recalled = outputs[:, -N_RECALL:].argmax(-1) == batch.targets[:, -N_RECALL:]
        sums["accuracy"] = (recalled.sum().item(), recalled.numel())
        return sums

    def finish_metrics(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        metrics = super().finish_metrics(sums)
        metrics["memoryless_loss"] = memoryless_loss(self.delay)
        return metrics
