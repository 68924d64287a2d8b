"""What a training job costs before it runs: memory and multiply-adds per step, from its config.

The service admits a job only when its estimate fits the worker (``worker/admission.py``); the
estimate is deliberately simple and errs on the large side for memory:

* **parameters** (real scalars, a complex entry counts 2), and as many again for their
  **gradients**, plus the **optimizer state** (Adam: 2 per parameter, RMSprop: 1);
* **activations** kept for backpropagation through time: ``batch x T x`` the floats each cell
  saves per sample and step (:data:`SAVED_PER_STEP`, measured: tests/core/test_cost.py), plus
  the one-hot inputs of the ``rnn``/``lstm`` baselines on token tasks and the readout's logits
  for per-step tasks;
* the **task's data** in memory (MNIST, an uploaded dataset);
* **flops per step**: ``2 x`` multiply-adds of the forward pass ``x 3`` (forward and backward),
  over ``batch x T``.

``T`` is the task's sequence length (:func:`task_shape`): copy ``delay + 20``, adding
``length``, mnist 784, text ``seq_len``, a dataset its longest sequence.

Example::

    >>> from kru_core.config import JobConfig
    >>> cfg = JobConfig.from_dict({"model": {"cell": "lstm", "hidden_size": 8192},
    ...                            "train": {"batch_size": 4096}})
    >>> estimate(cfg, task_shape(cfg.task)).memory_bytes > 200e9
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kru_core.config import JobConfig, TaskConfig

#: Bytes of one real scalar (float32 training).
SCALAR_BYTES = 4
#: Floats one sample saves for backward per time step, per unit of ``hidden_size`` (complex KRU
#: states count 2 floats per unit): measured on the eager recurrence with small configs
#: (tests/core/test_cost.py compares the estimate with the measured peak).
SAVED_PER_STEP = {"kru": 6.0, "kru_lstm": 20.0, "rnn": 4.0, "lstm": 20.0}
#: ... and per Kronecker factor (the KRU-LSTM's eager gates save each factor's product).
SAVED_PER_FACTOR = {"kru": 0.25, "kru_lstm": 4.5}
#: Floats per held-out or training example of the in-memory task data, per input step.
MNIST_IMAGES = 70_000
MNIST_STEPS = 784


@dataclass(frozen=True)
class TaskShape:
    """What the model sees of a task: sequence length, inputs, outputs, data in memory.

    Attributes:
        seq_len: ``T``, steps per training sequence (the longest one for datasets).
        in_dim: vocabulary size (tokens) or feature size.
        tokens: token inputs (one-hot for the ``rnn``/``lstm`` baselines).
        output_size: logits (or regression targets) per prediction.
        per_step: a prediction per step (else one per sequence).
        data_bytes: the task's data held in memory.
    """

    seq_len: int
    in_dim: int
    tokens: bool
    output_size: int
    per_step: bool
    data_bytes: int = 0


def task_shape(task: TaskConfig, summary: dict[str, Any] | None = None) -> TaskShape:
    """The :class:`TaskShape` of ``task``; ``summary`` is the uploaded dataset's (``dataset``
    and ``text`` tasks; without it a dataset's shape is unknown: ``ValueError``)."""
    if task.kind == "copy":
        return TaskShape(task.delay + 20, 10, True, 9, True)
    if task.kind == "adding":
        return TaskShape(task.length, 2, False, 1, False)
    if task.kind == "mnist":
        return TaskShape(MNIST_STEPS, 1, False, 10, False, MNIST_IMAGES * MNIST_STEPS * 4)
    if summary is None:
        raise ValueError(f"task {task.kind!r}: the dataset's summary is needed")
    size = int(summary.get("bytes") or 0)
    if task.kind == "text":
        vocab = int(summary.get("vocab_size") or 1)
        # int64 ids of every character, and one window per training sequence
        return TaskShape(task.seq_len, vocab, True, vocab, True, 8 * int(summary["characters"]))
    tokens = summary.get("input_kind") == "tokens"
    in_dim = int((summary.get("vocab_size") if tokens else summary.get("input_size")) or 1)
    classes = summary.get("num_classes")
    outputs = int(classes or summary.get("target_size") or 1)
    per_step = summary.get("kind") in ("labelling", "sequence_labelling", "per_step")
    longest = int((summary.get("lengths") or {}).get("max") or 1)
    # parsed JSON held as padded tensors: about 8 bytes per number of the file, generously
    return TaskShape(longest, in_dim, tokens, outputs, per_step, 8 * size)


def factor_shapes(hidden_size: int, factors: Any) -> list[tuple[int, int]]:
    """``(P, Q)`` of each Kronecker factor: the config's, or :func:`kru_core.factorize`'s."""
    if factors is None:
        from kru_core.kron import factorize

        return [(f, f) for f in factorize(hidden_size)]
    return [tuple(f) if isinstance(f, (tuple, list)) else (f, f) for f in factors]  # type: ignore[misc]


@dataclass(frozen=True)
class CostEstimate:
    """The estimated cost of a job (bytes, real scalars, flops)."""

    parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    data_bytes: int
    flops_per_step: float
    steps: int

    @property
    def memory_bytes(self) -> int:
        """Peak memory of training: everything above together."""
        return (
            self.parameter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.data_bytes
        )

    def seconds(self, flops_per_second: float) -> float:
        """Training time at ``flops_per_second`` (all steps; evaluation not counted)."""
        return self.steps * self.flops_per_step / flops_per_second

    def to_dict(self) -> dict[str, float]:
        """Plain JSON data (bytes, flops) for logs and error messages."""
        return {
            "parameters": self.parameters,
            "memory_bytes": self.memory_bytes,
            "activation_bytes": self.activation_bytes,
            "flops_per_step": self.flops_per_step,
        }


def estimate(config: JobConfig, shape: TaskShape) -> CostEstimate:
    """Estimate the memory and compute of training ``config`` on a task of ``shape``."""
    model, train = config.model, config.train
    n, cell = model.hidden_size, model.cell
    b, t = train.batch_size, shape.seq_len
    c = 2 if cell == "kru" and model.complex else 1  # real scalars per state entry
    features = c * n  # what the readout reads
    readout = features * shape.output_size + shape.output_size
    if cell in ("kru", "kru_lstm"):
        shapes = factor_shapes(n, model.factors)
        gates = 4 if cell == "kru_lstm" else 1
        factors = gates * sum(p * q for p, q in shapes) * c
        # a factor (P, Q) applied to the state: N / Q blocks of P x Q multiply-adds
        factor_macs = gates * sum(n // q * p * q for p, q in shapes) * c * c
        recurrent = factors + gates * n * shape.in_dim * c + gates * n
        recurrent_macs = factor_macs + (0 if shape.tokens else gates * n * shape.in_dim * c * c)
        saved = (SAVED_PER_STEP[cell] + SAVED_PER_FACTOR[cell] * len(shapes)) * n * c
    else:
        gates = 4 if cell == "lstm" else 1
        recurrent = gates * n * (n + shape.in_dim) + 2 * gates * n
        recurrent_macs = gates * n * (n + shape.in_dim)
        saved = SAVED_PER_STEP[cell] * n + (shape.in_dim if shape.tokens else 0)
    params = recurrent + readout
    outputs = shape.output_size * (3 if shape.per_step else 0)  # logits, softmax, their grad
    activations = b * t * (saved + outputs + features)
    macs = b * t * recurrent_macs + b * (t if shape.per_step else 1) * readout
    optimizer_slots = 2 if train.optimizer == "adam" else 1
    return CostEstimate(
        parameters=params,
        parameter_bytes=params * SCALAR_BYTES,
        gradient_bytes=params * SCALAR_BYTES,
        optimizer_bytes=optimizer_slots * params * SCALAR_BYTES,
        activation_bytes=int(activations * SCALAR_BYTES),
        data_bytes=shape.data_bytes,
        flops_per_step=float(2 * 3 * macs),
        steps=train.steps,
    )
