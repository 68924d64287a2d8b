"""Inference: a checkpoint loaded into a ready model, batch predictions and text generation.

:class:`LoadedModel` validates every input against the model's task before touching the model
(token range, feature size, finite numbers) and raises :class:`~kru_core.errors.InputError`
naming the offending value (``inputs.3.17``). Its outputs are the JSON of the HTTP predict route
and of ``kru predict``:

* per-step tasks (copy, sequence labelling, text): ``{"predictions": [[label, ...], ...]}``, one
  label per step of each sequence;
* sequence classification: one ``int`` per sequence; regression: one ``float`` (or a list of
  floats for vector targets) per sequence;
* with ``probabilities=True`` (classification only) also ``"probabilities"``: the softmax, per
  step or per sequence.

A sequence whose outputs are not finite (finite inputs too large for the model's float32
arithmetic) raises :class:`~kru_core.errors.InputError` naming the sequence, never a ``null``.

Serving builds on two lower-level pieces: :meth:`LoadedModel.encode` (validate and encode to
tensors) and :meth:`LoadedModel.forward_batch` (one forward pass over sequences of several
requests, optionally starting from and returning each sequence's hidden state, which is how a
streaming session continues a sequence chunk by chunk). :attr:`LoadedModel.step_cost` estimates
the multiply-adds of one step of one sequence (the serving cost limit).

Example::

    >>> model = LoadedModel.from_checkpoint("runs/copy20")
    >>> model.predict([[1, 2, 3, 4, 5, 6, 7, 8, 1, 2] + [0] * 19 + [9] + [0] * 10])
    {'predictions': [[0, 0, ..., 1, 2, 3, 4, 5, 6, 7, 8, 1, 2]]}
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kru_core.checkpoint import load_checkpoint
from kru_core.config import JobConfig
from kru_core.errors import InputError
from kru_core.models import build_model
from kru_core.tasks.base import TaskInfo

#: Sequences run through the model at once by :meth:`LoadedModel.predict`.
PREDICT_BATCH_SIZE = 256

#: The largest float32: feature values beyond it cannot be represented by the model.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: ``(field, message)`` of a sequence whose outputs are not finite.
NON_FINITE_OUTPUT = (
    "the model's output is not finite for this sequence (its values overflow the model's "
    "float32 arithmetic): send smaller values"
)


@dataclass
class BatchOutput:
    """What :meth:`LoadedModel.forward_batch` returns, one entry per input sequence.

    Attributes:
        predictions: per-step label lists, or one value per sequence (as in ``predict``).
        probabilities: the softmax per sequence when asked (classification), else ``None``s.
        finite: False where the sequence's outputs are not all finite (its prediction is
            then meaningless and must not be answered).
        states: each sequence's hidden state after its last step (``return_states``), in the
            form :meth:`forward_batch` takes back; else ``None``s.
    """

    predictions: list[Any]
    probabilities: list[Any]
    finite: list[bool]
    states: list[Any]


class ModelBusy(RuntimeError):
    """:meth:`LoadedModel.forward_batch` with ``wait=False`` found the model in use by another
    call (a forward pass or a generation in another thread)."""


class LoadedModel:
    """A trained model with its task, ready to predict.

    Attributes:
        info: ``task_kind``, ``target_kind``, ``input_kind``, ``vocab_size`` (token models) or
            ``input_size`` (feature models), ``output_size``, ``per_step``, ``scalar_target``,
            ``vocabulary`` (text models), ``extra`` (task details), ``config`` (the job config as
            a dict), ``step``, ``metrics``, ``parameter_counts``, ``checkpoint``.
        config: the :class:`~kru_core.config.JobConfig` of the run.
        task_info: the :class:`~kru_core.tasks.TaskInfo`.
        model: the :class:`~kru_core.models.SequenceModel` (eval mode).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task_info: TaskInfo,
        config: JobConfig,
        extra_info: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.task_info = task_info
        self.config = config
        self.device = next(model.parameters()).device
        self.info: dict[str, Any] = {
            **task_info.to_dict(),
            "config": config.to_dict(),
            **(extra_info or {}),
        }
        self._lock = threading.Lock()  # the model caches its effective factors between calls
        self._char_index = (
            {c: i for i, c in enumerate(task_info.vocabulary)} if task_info.vocabulary else None
        )
        self.step_cost = estimate_step_cost(self.model)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu") -> LoadedModel:
        """Load a checkpoint directory (or a run directory's latest checkpoint) onto ``device``.

        Raises:
            CheckpointError: the checkpoint is missing, incomplete or of an unknown format.
        """
        checkpoint = load_checkpoint(path, train_state=False, device=device)
        model = build_model(checkpoint.config.model, checkpoint.task_info, device=device)
        model.load_state_dict(checkpoint.model_state)
        extra = {
            "step": checkpoint.step,
            "metrics": checkpoint.metrics,
            "parameter_counts": checkpoint.parameter_counts,
            "checkpoint": str(checkpoint.path),
        }
        return cls(
            model, task_info=checkpoint.task_info, config=checkpoint.config, extra_info=extra
        )

    # -- predict -----------------------------------------------------------------------------

    def predict(self, inputs: Sequence[Any], *, probabilities: bool = False) -> dict[str, Any]:
        """Predictions for a batch of variable-length sequences (see the module docstring).

        Token models take lists of token ids (text models also take strings); feature models take
        lists of feature vectors (plain numbers when ``input_size`` is 1).

        Raises:
            InputError: a sequence does not fit the model, or its outputs are not finite (the
                field names it).
        """
        sequences = self.encode(inputs)
        out = self.forward_batch(sequences, probabilities=probabilities)
        for i, finite in enumerate(out.finite):
            if not finite:
                raise InputError(f"inputs.{i}", NON_FINITE_OUTPUT)
        result: dict[str, Any] = {"predictions": out.predictions}
        if self.wants_probabilities(probabilities):
            result["probabilities"] = out.probabilities
        return result

    def wants_probabilities(self, probabilities: bool) -> bool:
        """Whether ``probabilities=True`` gives probabilities (classification models only)."""
        return probabilities and self.task_info.target_kind == "classification"

    def encode(self, inputs: Any, *, checked: bool = False) -> list[Tensor]:
        """``inputs`` (lists of tokens, strings, lists of feature vectors) as one tensor per
        sequence, checked against the model (:func:`check_inputs`; InputError names the first
        bad value) unless the caller has already (``checked=True``)."""
        return self._encode_inputs(inputs, checked=checked)

    def forward_batch(
        self,
        sequences: Sequence[Tensor],
        *,
        probabilities: bool = False,
        states: Sequence[Any] | None = None,
        return_states: bool = False,
        wait: bool = True,
    ) -> BatchOutput:
        """One forward pass (in chunks of :data:`PREDICT_BATCH_SIZE`) over encoded sequences.

        Sequences of different lengths are right-padded and each is read at its own last step,
        so the answers are those of each sequence alone.

        Args:
            sequences: from :meth:`encode`, of any lengths.
            probabilities: also the softmax (classification models only).
            states: a hidden state per sequence to start from (from a previous call's
                ``states``; ``None`` entries start from zeros), or ``None`` for all zeros.
            return_states: also return each sequence's state after its last step.
            wait: wait for another call on this model to finish (else :class:`ModelBusy`).
        """
        want_probs = self.wants_probabilities(probabilities)
        out = BatchOutput([], [], [], [])
        if not self._lock.acquire(blocking=wait):
            raise ModelBusy("the model is running another call")
        try:
            with torch.inference_mode():
                for start in range(0, len(sequences), PREDICT_BATCH_SIZE):
                    chunk = list(sequences[start : start + PREDICT_BATCH_SIZE])
                    hx = None
                    if states is not None:
                        hx = self._stack_states(states[start : start + PREDICT_BATCH_SIZE])
                    self._predict_chunk(chunk, want_probs, hx, return_states, out)
        finally:
            self._lock.release()
        return out

    def _predict_chunk(
        self, chunk: list[Tensor], want_probs: bool, hx: Any, return_states: bool, out: BatchOutput
    ) -> None:
        lengths = torch.tensor([len(s) for s in chunk])
        x = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True).to(self.device)
        same = bool((lengths == lengths[0]).all())
        outputs, state = self.model(x, lengths=None if same else lengths.to(self.device), hx=hx)
        outputs = outputs.float().cpu()
        info = self.task_info
        rows = len(chunk)
        if return_states:
            out.states.extend(_split_state(state, rows))
        else:
            out.states.extend([None] * rows)
        finite = torch.isfinite(outputs)
        if info.per_step:
            steps = torch.arange(outputs.shape[1])[None, :] < lengths[:, None]
            out.finite.extend((finite.all(-1) | ~steps).all(-1).tolist())
        else:
            out.finite.extend(finite.reshape(rows, -1).all(-1).tolist())
        if info.target_kind == "regression":
            values = outputs[:, 0] if info.scalar_target else outputs
            out.predictions.extend(values.tolist())
            out.probabilities.extend([None] * rows)
            return
        labels = outputs.argmax(-1)
        soft = outputs.softmax(-1) if want_probs else None
        if not info.per_step:
            out.predictions.extend(labels.tolist())
            out.probabilities.extend(soft.tolist() if soft is not None else [None] * rows)
            return
        for row, n in enumerate(lengths.tolist()):
            out.predictions.append(labels[row, :n].tolist())
            out.probabilities.append(soft[row, :n].tolist() if soft is not None else None)

    def _stack_states(self, states: Sequence[Any]) -> Any:
        """One batched state from per-sequence ones (``None``: zeros of the same form)."""
        given = [s for s in states if s is not None]
        if not given:
            return None
        template = given[0]
        full = [s if s is not None else _zeros_like_state(template) for s in states]
        if isinstance(template, tuple):
            return tuple(
                torch.cat([s[k] for s in full], dim=_batch_dim(template[k])).to(self.device)
                for k in range(len(template))
            )
        return torch.cat(full, dim=_batch_dim(template)).to(self.device)

    def _encode_inputs(self, inputs: Any, *, checked: bool = False) -> list[Tensor]:
        if not checked:
            check_inputs(inputs, self.task_info)
        if self.task_info.input_kind == "tokens":
            return [self._encode_tokens(seq) for seq in inputs]
        return [self._encode_features(seq) for seq in inputs]

    def _encode_tokens(self, seq: Any) -> Tensor:
        if isinstance(seq, str):
            assert self._char_index is not None
            return torch.tensor([self._char_index[c] for c in seq], dtype=torch.long)
        return torch.tensor(seq, dtype=torch.long)

    def _encode_text(self, text: str, where: str) -> Tensor:
        _check_text(text, where, self.task_info.vocabulary)
        return self._encode_tokens(text)

    def _encode_features(self, seq: Any) -> Tensor:
        size = self.task_info.input_size
        rows = [
            [step] if size == 1 and not isinstance(step, (list, tuple)) else step for step in seq
        ]
        x = torch.tensor(rows, dtype=torch.float32)
        permutation = self.task_info.extra.get("input_permutation")
        if permutation is not None:  # permuted MNIST: clients send images in raster order
            x = x[torch.tensor(permutation)]
        return x

    # -- generate ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """Text continuing ``prompt``, sampled one character at a time (text models only).

        Args:
            prompt: the start, at least one character of the model's vocabulary.
            max_new_tokens: characters to add.
            temperature: divides the logits before sampling; 0 takes the most likely character.
                The division is done on the logits minus their maximum, in float64, so a tiny
                temperature (down to the smallest float) samples the most likely characters
                without overflowing (:func:`sampling_probabilities`).
            seed: seeds the sampling (``None``: nondeterministic).

        Returns:
            the new characters (without the prompt).
        """
        vocabulary = self.task_info.vocabulary
        if self.task_info.task_kind != "text" or not vocabulary:
            raise InputError(
                "model", f"generate needs a text model, got a {self.task_info.task_kind!r} model"
            )
        if not isinstance(prompt, str) or not prompt:
            raise InputError("prompt", "expected at least one character")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise InputError("max_new_tokens", f"expected an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise InputError("max_new_tokens", f"expected a value >= 0, got {max_new_tokens}")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise InputError("temperature", f"expected a finite number >= 0, got {temperature!r}")
        ids = self._encode_text(prompt, "prompt")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        out: list[str] = []
        with self._lock, torch.inference_mode():
            logits, hx = self.model(ids[None, :].to(self.device))
            for _ in range(max_new_tokens):
                last = logits[0, -1].float().cpu()
                if temperature == 0:
                    token = int(last.argmax())
                else:
                    probs = sampling_probabilities(last, temperature)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                out.append(vocabulary[token])
                x = torch.tensor([[token]], device=self.device)
                logits, hx = self.model(x, hx=hx)
        return "".join(out)


def check_inputs(inputs: Any, info: TaskInfo) -> None:
    """Check the sequences of a predict request against the model's task; raise
    :class:`~kru_core.errors.InputError` naming the culprit (``inputs.3.17``).

    The one set of input checks: :class:`LoadedModel` runs them before encoding (unless told
    they ran: ``encode(checked=True)``), and the service (``app/predictor.py``) before a request
    joins a batch, adding only its limits.
    Token models take lists of ints in ``[0, vocab_size)``, and text models also strings of
    vocabulary characters; feature models take lists of ``input_size`` finite numbers within
    float32's range per step (plain numbers when ``input_size`` is 1); permuted-MNIST models
    take whole images.
    """
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise InputError("inputs", "expected a non-empty list of sequences")
    tokens = info.input_kind == "tokens"
    permutation = info.extra.get("input_permutation")
    for i, sequence in enumerate(inputs):
        where = f"inputs.{i}"
        if not isinstance(sequence, (list, tuple, str)):
            raise InputError(where, f"expected a sequence (a list of steps), got {sequence!r}")
        if len(sequence) == 0:
            raise InputError(where, "expected at least one step, got an empty sequence")
        if tokens and isinstance(sequence, str):
            _check_text(sequence, where, info.vocabulary)
        elif tokens:
            assert info.vocab_size is not None
            _check_tokens(sequence, where, info.vocab_size)
        else:
            assert info.input_size is not None
            _check_features(sequence, where, info.input_size)
        if permutation is not None and len(sequence) != len(permutation):
            raise InputError(where, f"expected {len(permutation)} steps, got {len(sequence)}")


def _check_text(text: str, where: str, vocabulary: Sequence[str] | None) -> None:
    if not vocabulary:
        raise InputError(where, "expected a list of tokens: only text models take strings")
    if not text:
        raise InputError(where, "expected at least one character")
    known = set(vocabulary)
    for j, char in enumerate(text):
        if char not in known:
            raise InputError(f"{where}.{j}", f"character {char!r} is not in the model's vocabulary")


def _check_tokens(sequence: Sequence[Any], where: str, vocab_size: int) -> None:
    # The common case at C speed (type() is exact: a bool is not an int here); the loop below
    # finds and names the first bad token otherwise.
    if all(type(token) is int for token in sequence) and (
        not sequence or (min(sequence) >= 0 and max(sequence) < vocab_size)
    ):
        return
    for j, token in enumerate(sequence):
        if isinstance(token, bool) or not isinstance(token, int):
            raise InputError(
                f"{where}.{j}",
                f"expected a token (an integer in [0, {vocab_size - 1}]), got {token!r}: this "
                "model takes lists of tokens",
            )
        if not 0 <= token < vocab_size:
            raise InputError(
                f"{where}.{j}", f"expected a token in [0, {vocab_size - 1}], got {token}"
            )


def _check_features(sequence: Sequence[Any], where: str, input_size: int) -> None:
    if isinstance(sequence, str):
        raise InputError(where, "expected a list of feature vectors: only text models take strings")
    vectors = isinstance(sequence[0], (list, tuple))
    for j, step in enumerate(sequence):
        if input_size == 1 and isinstance(step, (list, tuple)) != vectors:
            raise InputError(
                f"{where}.{j}",
                f"expected {'a feature vector' if vectors else 'a number'} like the first step, "
                f"got {step!r}: send every step as a number, or every step as a list",
            )
        vector = [step] if input_size == 1 and not isinstance(step, (list, tuple)) else step
        if not isinstance(vector, (list, tuple)):
            raise InputError(
                f"{where}.{j}",
                f"expected a feature vector (a list of {input_size} numbers), got {step!r}: this "
                "model takes lists of feature vectors",
            )
        if len(vector) != input_size:
            raise InputError(
                f"{where}.{j}", f"expected {input_size} features per step, got {len(vector)}"
            )
        for k, value in enumerate(vector):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{where}.{j}.{k}", f"expected a number, got {value!r}")
            if not math.isfinite(value):
                raise InputError(f"{where}.{j}.{k}", f"expected a finite number, got {value}")
            if abs(value) > FLOAT32_MAX:
                raise InputError(
                    f"{where}.{j}.{k}",
                    f"expected a number within float32's range (|x| <= {FLOAT32_MAX:.4g}), "
                    f"got {value}",
                )


def sampling_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """``softmax(logits / temperature)`` that never overflows (``temperature > 0``).

    The logits are shifted so their maximum is 0 and divided in float64: every scaled value is
    in ``[-inf, 0]`` and the most likely tokens get ``exp(0) = 1``, so even a temperature of
    ``5e-324`` gives a valid distribution (all mass on the maximum, ties shared) instead of
    ``inf / inf``.
    """
    shifted = logits.double() - logits.double().max()
    return torch.softmax(shifted / temperature, dim=-1)


def estimate_step_cost(model: torch.nn.Module) -> int:
    """Multiply-adds of one step of one sequence, estimated from the model's layers.

    Every dense weight is used once per step, so the estimate is the number of real
    parameters, plus for Kronecker recurrences the cost of applying each ``P x Q`` factor to
    the whole state (``N * P`` per factor, 4x for complex factors) instead of the factors'
    few parameters. A serving limit multiplies it by the steps of a request.
    """
    total = sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())
    rnn = getattr(model, "rnn", None)
    factors = getattr(rnn, "recurrent_factors", None)
    hidden = getattr(model, "hidden_size", None)
    if factors is not None and hidden:
        per_gate = sum(hidden * w.shape[0] * (4 if w.is_complex() else 1) for w in factors)
        total += per_gate
    return max(1, int(total))


def state_to_bytes(state: Any) -> bytes:
    """A hidden state from :meth:`LoadedModel.forward_batch` as bytes (to store a session).

    A small JSON header (dtype and shape of each tensor, whether it is an ``(h, c)`` pair)
    and the raw values: about 20x faster to read back than ``torch.save``'s zip archive.
    """
    tensors = state if isinstance(state, tuple) else (state,)
    arrays = [t.detach().cpu().contiguous().numpy() for t in tensors]
    header = json.dumps(
        {
            "pair": isinstance(state, tuple),
            "tensors": [[str(a.dtype), list(a.shape)] for a in arrays],
        }
    ).encode()
    return len(header).to_bytes(4, "little") + header + b"".join(a.tobytes() for a in arrays)


def state_from_bytes(data: bytes) -> Any:
    """The hidden state :func:`state_to_bytes` wrote."""
    size = int.from_bytes(data[:4], "little")
    header = json.loads(data[4 : 4 + size])
    offset, tensors = 4 + size, []
    for dtype, shape in header["tensors"]:
        array = np.frombuffer(data, dtype=np.dtype(dtype), count=math.prod(shape), offset=offset)
        offset += array.nbytes
        tensors.append(torch.from_numpy(array.reshape(shape).copy()))
    return tuple(tensors) if header["pair"] else tensors[0]


def _batch_dim(tensor: Tensor) -> int:
    """Batch dimension of a state tensor: ``(B, N)`` (KRU, KRU-LSTM) or ``(1, B, N)`` (torch.nn)."""
    return 0 if tensor.dim() == 2 else 1


def _split_state(state: Any, rows: int) -> list[Any]:
    if isinstance(state, tuple):
        parts = [_split_state(s, rows) for s in state]
        return [tuple(p[i] for p in parts) for i in range(rows)]
    dim = _batch_dim(state)
    return [state.narrow(dim, i, 1).detach().cpu().clone() for i in range(rows)]


def _zeros_like_state(state: Any) -> Any:
    if isinstance(state, tuple):
        return tuple(torch.zeros_like(s) for s in state)
    return torch.zeros_like(state)
