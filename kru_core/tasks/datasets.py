"""User datasets: JSONL files, one example a line, ``{"input": [...], "target": ...}``.

* ``input``: a list of token ids (integers >= 0) or of feature vectors (lists of numbers, all of
  one size). Sequences may differ in length; batches are padded and the padding masked.
* ``target``: an integer (sequence classification), a number or list of numbers (regression),
  or a list of integer labels with one label per input step (sequence labelling).

The kind is inferred from the whole file: integer targets are classes, and a target written
``3.0`` (any non-integer number) makes the file a regression; lists of integers as long as their
inputs on every line are sequence labels. Every line is checked; a file with any bad line raises
:class:`~kru_core.errors.DatasetError` listing each one with its line number, and nothing is
loaded. Blank lines are skipped; other keys than ``input`` and ``target`` are ignored.

Example::

    {"input": [3, 1, 4], "target": 1}
    {"input": [[0.5, 1.0], [0.25, -2.0]], "target": [0.1, 0.2]}
    {"input": [5, 9, 2, 6], "target": [0, 1, 1, 0]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from kru_core.errors import DatasetError
from kru_core.tasks.base import IGNORE_INDEX, Batch, Task, TaskInfo

DatasetKind = Literal["classification", "regression", "sequence_labelling"]

MAX_VOCAB = 65_536  # token ids and class labels must stay below this
MAX_FEATURES = 65_536  # feature vector and regression target sizes


@dataclass(frozen=True)
class _Line:
    number: int
    input: list[Any]
    input_kind: str  # "tokens" | "features"
    feature_size: int | None
    target: Any
    target_kind: str  # "label" | "number" | "labels" | "numbers"


@dataclass(frozen=True)
class JsonlDataset:
    """A parsed, validated JSONL dataset.

    Attributes:
        kind: ``classification``, ``regression`` or ``sequence_labelling``.
        input_kind: ``tokens`` or ``features``.
        inputs: one tensor per example: ``LongTensor (T,)`` or ``FloatTensor (T, input_size)``.
        targets: one tensor per example: ``LongTensor ()`` class, ``FloatTensor (K,)`` or
            ``LongTensor (T,)`` labels.
        vocab_size: tokens: the largest id + 1.
        input_size: features: the vector size.
        num_classes: classification and labelling: the largest label + 1.
        target_size: regression: K.
        scalar_target: regression: the targets were plain numbers.
    """

    kind: DatasetKind
    input_kind: Literal["tokens", "features"]
    inputs: list[Tensor]
    targets: list[Tensor]
    vocab_size: int | None
    input_size: int | None
    num_classes: int | None
    target_size: int | None
    scalar_target: bool

    def __len__(self) -> int:
        return len(self.inputs)

    def summary(self) -> dict[str, Any]:
        """What an upload holds: kind, examples, input kind and size, classes or target size,
        sequence lengths."""
        lengths = [len(x) for x in self.inputs]
        return {
            "format": "jsonl",
            "kind": self.kind,
            "examples": len(self),
            "input_kind": self.input_kind,
            "vocab_size": self.vocab_size,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
            "target_size": self.target_size,
            "lengths": {
                "min": min(lengths),
                "max": max(lengths),
                "mean": sum(lengths) / len(lengths),
            },
        }


def load_dataset(path: str | Path) -> JsonlDataset:
    """Parse and validate a JSONL dataset; raise :class:`DatasetError` listing every bad line."""
    errors: list[tuple[int, str]] = []
    lines: list[_Line] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = _parse_line(number, raw)
            except _LineError as exc:
                errors.append((number, str(exc)))
                continue
            if line is not None:
                lines.append(line)
    if not lines and not errors:
        raise DatasetError([(0, "the file holds no examples")])
    return _build(lines, errors)


def inspect_dataset(path: str | Path) -> dict[str, Any]:
    """Validate a JSONL upload and describe it (:meth:`JsonlDataset.summary`, plus ``bytes``).

    Raises :class:`DatasetError` (every bad line with its number) when it is malformed.
    """
    summary = load_dataset(path).summary()
    summary["bytes"] = Path(path).stat().st_size
    return summary


class _LineError(Exception):
    pass


def _reject_constant(name: str) -> None:
    raise _LineError(f"expected finite numbers, got {name}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # json.loads turns 1e999 into inf: refuse it like NaN
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _parse_line(number: int, raw: bytes) -> _Line | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _LineError("not valid UTF-8") from None
    if number == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _LineError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise _LineError(f'expected an object {{"input": ..., "target": ...}}, got {_kind(obj)}')
    for key in ("input", "target"):
        if key not in obj:
            raise _LineError(f'missing "{key}"')
    input_kind, feature_size = _check_input(obj["input"])
    target_kind = _check_target(obj["target"])
    return _Line(number, obj["input"], input_kind, feature_size, obj["target"], target_kind)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), "null" if v is None else "a number"
    )


def _check_input(value: Any) -> tuple[str, int | None]:
    if not isinstance(value, list) or not value:
        raise _LineError(f"input: expected a non-empty list, got {_kind(value)}")
    if all(_is_int(v) for v in value):
        bad = next((i for i, v in enumerate(value) if not 0 <= v < MAX_VOCAB), None)
        if bad is not None:
            raise _LineError(
                f"input.{bad}: expected a token id in [0, {MAX_VOCAB}), got {value[bad]}"
            )
        return "tokens", None
    if all(isinstance(v, list) for v in value):
        size = len(value[0])
        if not 0 < size <= MAX_FEATURES:
            raise _LineError(f"input.0: expected 1 to {MAX_FEATURES} features, got {size}")
        for i, vec in enumerate(value):
            if len(vec) != size:
                raise _LineError(
                    f"input.{i}: expected {size} features like input.0, got {len(vec)}"
                )
            if not all(_is_number(x) for x in vec):
                raise _LineError(f"input.{i}: expected finite numbers")
        return "features", size
    raise _LineError("input: expected a list of token ids (integers) or of feature vectors")


def _check_target(value: Any) -> str:
    if _is_int(value):
        if not 0 <= value < MAX_VOCAB:
            raise _LineError(f"target: expected a class label in [0, {MAX_VOCAB}), got {value}")
        return "label"
    if _is_number(value):
        return "number"
    if isinstance(value, list) and value:
        if all(_is_int(v) for v in value):
            return "labels"
        if all(_is_number(v) for v in value):
            if len(value) > MAX_FEATURES:
                raise _LineError(
                    f"target: expected at most {MAX_FEATURES} numbers, got {len(value)}"
                )
            return "numbers"
    raise _LineError(
        "target: expected an integer, a finite number, or a non-empty list of numbers, "
        f"got {_kind(value)}"
    )


def _infer_kind(lines: list[_Line]) -> DatasetKind:
    """The dataset kind; lines that do not fit it are reported by :func:`_consistency`."""
    kinds = {line.target_kind for line in lines}
    first = lines[0]
    if kinds == {"label"}:
        return "classification"
    if kinds <= {"label", "number"}:
        return "regression"
    if kinds == {"labels"}:
        per_step = [len(x.target) == len(x.input) for x in lines]
        if all(per_step):
            return "sequence_labelling"
        if len({len(x.target) for x in lines}) > 1 and per_step[0]:
            return "sequence_labelling"  # mostly labels per step: report the lines that are not
        return "regression"
    if kinds <= {"labels", "numbers"}:
        return "regression"
    # scalar and list targets mixed: the first line sets the expectation
    if first.target_kind == "label" and "number" not in kinds:
        return "classification"
    return "regression"


def _build(lines: list[_Line], errors: list[tuple[int, str]]) -> JsonlDataset:
    if lines:
        first = lines[0]
        kind = _infer_kind(lines)
        for line in lines:
            problem = _consistency(line, first, kind)
            if problem:
                errors.append((line.number, problem))
        if kind == "sequence_labelling":
            for line in lines:
                if any(v < 0 or v >= MAX_VOCAB for v in line.target):
                    errors.append((line.number, f"target: expected labels in [0, {MAX_VOCAB})"))
    if errors:
        raise DatasetError(sorted(errors))
    input_kind = first.input_kind
    if input_kind == "tokens":
        inputs = [torch.tensor(x.input, dtype=torch.long) for x in lines]
        vocab_size = max(int(x.max()) for x in inputs) + 1
    else:
        inputs = [torch.tensor(x.input, dtype=torch.float32) for x in lines]
        vocab_size = None
    if kind == "classification":
        targets = [torch.tensor(x.target, dtype=torch.long) for x in lines]
        num_classes, target_size = max(int(t) for t in targets) + 1, None
    elif kind == "sequence_labelling":
        targets = [torch.tensor(x.target, dtype=torch.long) for x in lines]
        num_classes, target_size = max(int(t.max()) for t in targets) + 1, None
    else:
        targets = [torch.tensor(x.target, dtype=torch.float32).reshape(-1) for x in lines]
        num_classes, target_size = None, targets[0].numel()
    return JsonlDataset(
        kind=kind,
        input_kind=input_kind,
        inputs=inputs,
        targets=targets,
        vocab_size=vocab_size,
        input_size=first.feature_size,
        num_classes=num_classes,
        target_size=target_size,
        scalar_target=kind == "regression" and first.target_kind in ("label", "number"),
    )


def _consistency(line: _Line, first: _Line, kind: DatasetKind) -> str | None:
    if line.input_kind != first.input_kind:
        want = "token ids" if first.input_kind == "tokens" else "feature vectors"
        return f"input: expected {want} as on line {first.number}"
    if line.feature_size != first.feature_size:
        return (
            f"input: expected feature vectors of size {first.feature_size} as on line "
            f"{first.number}, got {line.feature_size}"
        )
    scalar = line.target_kind in ("label", "number")
    if kind == "classification" and line.target_kind != "label":
        return f"target: expected a class label (an integer) as on line {first.number}"
    if kind == "sequence_labelling" and line.target_kind != "labels":
        return f"target: expected a list of labels as on line {first.number}"
    if kind == "sequence_labelling" and len(line.target) != len(line.input):
        return (
            f"target: expected one label per input step ({len(line.input)}), got {len(line.target)}"
        )
    if kind == "regression":
        first_scalar = first.target_kind in ("label", "number")
        if scalar != first_scalar:
            want = "a number" if first_scalar else "a list of numbers"
            return f"target: expected {want} as on line {first.number}"
        if not scalar and len(line.target) != len(first.target):
            return (
                f"target: expected {len(first.target)} numbers as on line {first.number}, "
                f"got {len(line.target)}"
            )
    return None


def collate(inputs: list[Tensor], targets: list[Tensor], *, per_step: bool) -> Batch:
    """Pad variable-length examples into a :class:`Batch` (``lengths`` set when they differ)."""
    lengths = torch.tensor([len(x) for x in inputs])
    padded = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=0)
    if per_step:
        stacked = torch.nn.utils.rnn.pad_sequence(
            targets, batch_first=True, padding_value=IGNORE_INDEX
        )
    else:
        stacked = torch.stack(targets)
    same = bool((lengths == lengths[0]).all())
    return Batch(padded, stacked, None if same else lengths)


class DatasetTask(Task):
    """A JSONL dataset as a task: a seeded held-out split, random training batches.

    The held-out split has ``min(eval_size, len // 10)`` examples (at least 1); a dataset of a
    single example is evaluated on that example.
    """

    def __init__(self, dataset: JsonlDataset, *, eval_size: int, seed: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        per_step = dataset.kind == "sequence_labelling"
        regression = dataset.kind == "regression"
        self.primary_metric = "mse" if regression else "accuracy"
        self.info = TaskInfo(
            task_kind="dataset",
            target_kind="regression" if regression else "classification",
            input_kind=dataset.input_kind,
            output_size=dataset.target_size if regression else dataset.num_classes,
            per_step=per_step,
            vocab_size=dataset.vocab_size,
            input_size=dataset.input_size,
            scalar_target=dataset.scalar_target,
            extra={"dataset_kind": dataset.kind, "examples": len(dataset)},
        )
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_eval = max(1, min(eval_size, n // 10))
        eval_index = order[:n_eval]
        self._train_index = order[n_eval:] if n > 1 else order
        self._eval_sets["valid"] = self._collate(eval_index)

    @property
    def sequence_length(self) -> int:
        """The longest sequence of the whole dataset."""
        return max(len(x) for x in self.dataset.inputs)

    def _collate(self, index: Tensor) -> Batch:
        d = self.dataset
        return collate(
            [d.inputs[i] for i in index.tolist()],
            [d.targets[i] for i in index.tolist()],
            per_step=self.info.per_step,
        )

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        pick = torch.randint(0, len(self._train_index), (batch_size,), generator=generator)
        return self._collate(self._train_index[pick])

    def _slice(self, data: Batch, start: int, stop: int) -> Batch:
        batch = super()._slice(data, start, stop)
        if batch.lengths is not None and bool((batch.lengths == batch.lengths[0]).all()):
            batch.lengths = None  # equal lengths after trimming: nothing to mask
        return batch


def is_finite_number(v: Any) -> bool:
    """A JSON number that is neither NaN nor infinite (and not a boolean)."""
    return _is_number(v) and math.isfinite(v)
