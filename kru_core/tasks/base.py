"""What every task provides: its description (:class:`TaskInfo`), batches, loss and metrics.

A task turns a :class:`~kru_core.config.TaskConfig` into tensors for a
:class:`~kru_core.models.SequenceModel`:

* token inputs are ``LongTensor (B, T)``, feature inputs ``FloatTensor (B, T, input_size)``;
* per-step targets are ``LongTensor (B, T)`` padded with :data:`IGNORE_INDEX`, sequence
  classification targets ``LongTensor (B,)``, regression targets ``FloatTensor (B, K)``;
* ``lengths`` (``LongTensor (B,)``) is set when the sequences of a batch differ in length; the
  padded steps are masked out of the loss and the metrics.

Training batches are drawn with an explicit ``torch.Generator`` (the engine checkpoints its
state, so a resumed run sees the same batches); the held-out sets are fixed when the task is
built.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Target value of padded steps in per-step targets (``torch.nn.functional.cross_entropy``'s).
IGNORE_INDEX = -100

TargetKind = Literal["classification", "regression"]
InputKind = Literal["tokens", "features"]


@dataclass(frozen=True)
class TaskInfo:
    """Everything a model and a predictor need to know about a task; stored in checkpoints.

    Args:
        task_kind: the config's ``task.kind`` (``copy``, ``adding``, ``mnist``, ``dataset``,
            ``text``).
        target_kind: ``classification`` (a label per sequence or per step) or ``regression``.
        input_kind: ``tokens`` (integer ids below ``vocab_size``) or ``features`` (vectors of
            ``input_size`` floats).
        output_size: classes, or the regression target size.
        per_step: a target per step (copy, sequence labelling, text) or one per sequence.
        vocab_size: token inputs: the number of distinct token ids.
        input_size: feature inputs: the feature vector size.
        scalar_target: regression: targets are plain numbers rather than lists.
        vocabulary: text: the characters, the id of each being its index.
        extra: task details (e.g. ``delay``, ``memoryless_loss``, ``input_permutation``).
    """

    task_kind: str
    target_kind: TargetKind
    input_kind: InputKind
    output_size: int
    per_step: bool
    vocab_size: int | None = None
    input_size: int | None = None
    scalar_target: bool = False
    vocabulary: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head(self) -> str:
        """The :class:`~kru_core.models.SequenceModel` head: ``per_step`` or ``last``."""
        return "per_step" if self.per_step else "last"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; :meth:`from_dict` rebuilds it."""
        return {
            "task_kind": self.task_kind,
            "target_kind": self.target_kind,
            "input_kind": self.input_kind,
            "output_size": self.output_size,
            "per_step": self.per_step,
            "vocab_size": self.vocab_size,
            "input_size": self.input_size,
            "scalar_target": self.scalar_target,
            "vocabulary": self.vocabulary,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskInfo:
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(**data)


@dataclass
class Batch:
    """One batch of sequences (see the module docstring for the shapes)."""

    inputs: Tensor
    targets: Tensor
    lengths: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), lengths)


def eval_seed(seed: int) -> int:
    """The seed of a task's generated held-out set, apart from the training stream's ``seed``."""
    return (seed + 0x5EED_E7A1) % 2**63


def step_mask(lengths: Tensor | None, batch: int, steps: int, device: torch.device) -> Tensor:
    """``BoolTensor (B, T)``: true on the valid (unpadded) steps."""
    if lengths is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    return torch.arange(steps, device=device)[None, :] < lengths.to(device)[:, None]


class Task:
    """Base class of the tasks: held-out sets, loss and metrics by target kind.

    Subclasses set :attr:`info`, implement :meth:`train_batch`, and fill :attr:`_eval_sets`
    (split name -> list of examples as a single :class:`Batch`).
    """

    info: TaskInfo
    #: The metric a progress bar shows (``accuracy``, ``mse``, ``bpc``); lower is better for all
    #: but ``accuracy``.
    primary_metric: str = "accuracy"

    def __init__(self) -> None:
        self._eval_sets: dict[str, Batch] = {}

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A fresh training batch drawn with ``generator``."""
        raise NotImplementedError

    @property
    def sequence_length(self) -> int:
        """Steps in the task's sequences (the longest held-out one when lengths vary): how far
        the training engine has to backpropagate, which sets the factors' default rate."""
        return int(self._split("valid").inputs.shape[1])

    @property
    def splits(self) -> tuple[str, ...]:
        """The held-out splits: ``valid`` (evaluated during training), maybe ``test``."""
        return tuple(self._eval_sets)

    def eval_size(self, split: str = "valid") -> int:
        """Examples in a held-out split."""
        return len(self._split(split))

    def eval_batches(
        self, batch_size: int, split: str = "valid", *, limit: int | None = None
    ) -> Iterator[Batch]:
        """The fixed held-out examples of ``split`` (the first ``limit`` of them) in batches of
        at most ``batch_size``."""
        data = self._split(split)
        stop = len(data) if limit is None else min(limit, len(data))
        for start in range(0, stop, batch_size):
            yield self._slice(data, start, min(start + batch_size, stop))

    def _split(self, split: str) -> Batch:
        if split not in self._eval_sets:
            raise KeyError(f"expected a split in {list(self._eval_sets)}, got {split!r}")
        return self._eval_sets[split]

    def _slice(self, data: Batch, start: int, stop: int) -> Batch:
        lengths = None if data.lengths is None else data.lengths[start:stop]
        inputs, targets = data.inputs[start:stop], data.targets[start:stop]
        if lengths is not None:  # trim the padding the slice does not need
            longest = int(lengths.max())
            inputs = inputs[:, :longest]
            if self.info.per_step:
                targets = targets[:, :longest]
        return Batch(inputs, targets, lengths)

    # -- loss and metrics ------------------------------------------------------------------

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The mean training loss of ``outputs`` (the model's logits) on ``batch``."""
        if self.info.target_kind == "regression":
            return F.mse_loss(outputs, batch.targets)
        if self.info.per_step:
            return F.cross_entropy(
                outputs.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX
            )
        return F.cross_entropy(outputs, batch.targets)

    def metric_sums(self, outputs: Tensor, batch: Batch) -> dict[str, tuple[float, float]]:
        """Per-batch ``metric -> (sum, count)``, summed over batches by :meth:`finish_metrics`."""
        if self.info.target_kind == "regression":
            se = (outputs.float() - batch.targets).pow(2).sum().item()
            return {"loss": (se, batch.targets.numel())}
        targets = batch.targets
        if self.info.per_step:
            outputs, targets = outputs.flatten(0, 1), targets.flatten()
        valid = targets != IGNORE_INDEX
        ce = F.cross_entropy(outputs.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((outputs.argmax(-1) == targets) & valid).sum().item()
        count = valid.sum().item()
        return {"loss": (ce.item(), count), "accuracy": (correct, count)}

    def finish_metrics(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        """Turn summed :meth:`metric_sums` into metrics (``loss`` and task metrics)."""
        metrics = {k: (s / c if c else math.nan) for k, (s, c) in sums.items()}
        if self.info.target_kind == "regression":
            metrics["mse"] = metrics["loss"]
        return metrics


def accumulate(
    total: dict[str, tuple[float, float]], part: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Add ``part``'s ``(sum, count)`` pairs into ``total`` (returned)."""
    for key, (s, c) in part.items():
        s0, c0 = total.get(key, (0.0, 0.0))
        total[key] = (s0 + s, c0 + c)
    return total
