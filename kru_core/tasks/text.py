"""Character-level language modelling on a UTF-8 text file.

The vocabulary is the sorted set of the file's characters (stored with the model, so that a
predictor encodes prompts the same way). The last tenth of the text (at least one window) is
held out; training windows of ``seq_len + 1`` characters start at random offsets in the rest.
The inputs are a window's first ``seq_len`` characters, the targets the next character at each
step. The metric is bits per character (``bpc``, the cross-entropy in base 2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kru_core.errors import DatasetError
from kru_core.tasks.base import Batch, Task, TaskInfo

MAX_VOCAB = 65_536  # distinct characters
HELD_OUT_FRACTION = 0.1


def read_text(path: str | Path) -> str:
    """The file as text; raise :class:`DatasetError` naming every line that is not UTF-8."""
    data = Path(path).read_bytes()
    errors = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append((number, f"not valid UTF-8 (byte {exc.start + 1} of the line)"))
    if errors:
        raise DatasetError(errors)
    text = data.decode("utf-8").removeprefix("\ufeff")
    if not text:
        raise DatasetError([(0, "the file is empty")])
    return text


def build_vocabulary(text: str) -> list[str]:
    """The sorted distinct characters of ``text``; a character's id is its index."""
    vocabulary = sorted(set(text))
    if len(vocabulary) > MAX_VOCAB:
        raise DatasetError([(0, f"expected at most {MAX_VOCAB} distinct characters, got more")])
    return vocabulary


def inspect_text(path: str | Path) -> dict[str, Any]:
    """Validate a text upload and describe it: characters, lines, vocabulary.

    Raises :class:`DatasetError` for bytes that are not UTF-8 (each line named) or an empty file.
    """
    text = read_text(path)
    vocabulary = build_vocabulary(text)
    return {
        "format": "text",
        "kind": "text",
        "bytes": Path(path).stat().st_size,
        "characters": len(text),
        "lines": text.count("\n") + (0 if text.endswith("\n") else 1),
        "vocab_size": len(vocabulary),
        "vocabulary": vocabulary,
    }


def encode(text: str, vocabulary: list[str]) -> Tensor:
    """``LongTensor (len(text),)`` of character ids; every character must be in ``vocabulary``."""
    index = {c: i for i, c in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


class TextTask(Task):
    """Next-character prediction on windows of ``seq_len`` characters; metric ``bpc``."""

    primary_metric = "bpc"

    def __init__(self, text: str, *, seq_len: int, eval_size: int) -> None:
        super().__init__()
        vocabulary = build_vocabulary(text)
        need = 2 * (seq_len + 1)
        if len(text) < need:
            raise DatasetError(
                [
                    (
                        0,
                        f"the text has {len(text)} characters; task.seq_len={seq_len} needs at "
                        f"least {need} (a training and a held-out window)",
                    )
                ]
            )
        self.seq_len = seq_len
        self.info = TaskInfo(
            task_kind="text",
            target_kind="classification",
            input_kind="tokens",
            output_size=len(vocabulary),
            per_step=True,
            vocab_size=len(vocabulary),
            vocabulary=vocabulary,
            extra={"characters": len(text), "seq_len": seq_len},
        )
        ids = encode(text, vocabulary)
        n_eval = max(int(len(ids) * HELD_OUT_FRACTION), seq_len + 1)
        self._train_ids = ids[: len(ids) - n_eval]
        held_out = ids[len(ids) - n_eval :]
        windows = min(eval_size, (len(held_out) - 1) // seq_len)
        starts = torch.arange(windows) * seq_len
        self._eval_sets["valid"] = self._windows(held_out, starts)

    def _windows(self, ids: Tensor, starts: Tensor) -> Batch:
        index = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        chunk = ids[index]
        return Batch(chunk[:, :-1], chunk[:, 1:])

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        high = len(self._train_ids) - self.seq_len  # last start with a full window
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        return self._windows(self._train_ids, starts)

    def finish_metrics(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        metrics = super().finish_metrics(sums)
        metrics["bpc"] = metrics["loss"] / math.log(2)
        return metrics
