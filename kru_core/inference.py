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

Example::

    >>> model = LoadedModel.from_checkpoint("runs/copy20")
    >>> model.predict([[1, 2, 3, 4, 5, 6, 7, 8, 1, 2] + [0] * 19 + [9] + [0] * 10])
    {'predictions': [[0, 0, ..., 1, 2, 3, 4, 5, 6, 7, 8, 1, 2]]}
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kru_core.checkpoint import load_checkpoint
from kru_core.config import JobConfig
from kru_core.errors import InputError
from kru_core.tasks.base import TaskInfo
from kru_core.training import build_model

#: Sequences run through the model at once by :meth:`LoadedModel.predict`.
PREDICT_BATCH_SIZE = 256


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
            InputError: a sequence does not fit the model (the field names it).
        """
        sequences = self._encode_inputs(inputs)
        predictions: list[Any] = []
        probs: list[Any] = []
        want_probs = probabilities and self.task_info.target_kind == "classification"
        with self._lock, torch.inference_mode():
            for start in range(0, len(sequences), PREDICT_BATCH_SIZE):
                chunk = sequences[start : start + PREDICT_BATCH_SIZE]
                p, q = self._predict_chunk(chunk, want_probs)
                predictions.extend(p)
                probs.extend(q)
        out: dict[str, Any] = {"predictions": predictions}
        if want_probs:
            out["probabilities"] = probs
        return out

    def _predict_chunk(self, chunk: list[Tensor], want_probs: bool) -> tuple[list, list]:
        lengths = torch.tensor([len(s) for s in chunk])
        x = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True).to(self.device)
        same = bool((lengths == lengths[0]).all())
        outputs, _ = self.model(x, lengths=None if same else lengths.to(self.device))
        outputs = outputs.float().cpu()
        info = self.task_info
        if info.target_kind == "regression":
            if info.scalar_target:
                return outputs[:, 0].tolist(), []
            return outputs.tolist(), []
        labels = outputs.argmax(-1)
        soft = outputs.softmax(-1) if want_probs else None
        if not info.per_step:
            return labels.tolist(), soft.tolist() if soft is not None else []
        preds, probs = [], []
        for row, n in enumerate(lengths.tolist()):
            preds.append(labels[row, :n].tolist())
            if soft is not None:
                probs.append(soft[row, :n].tolist())
        return preds, probs

    def _encode_inputs(self, inputs: Any) -> list[Tensor]:
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise InputError("inputs", "expected a non-empty list of sequences")
        if self.task_info.input_kind == "tokens":
            return [self._encode_tokens(seq, f"inputs.{i}") for i, seq in enumerate(inputs)]
        return [self._encode_features(seq, f"inputs.{i}") for i, seq in enumerate(inputs)]

    def _encode_tokens(self, seq: Any, where: str) -> Tensor:
        if isinstance(seq, str) and self._char_index is not None:
            if not seq:
                raise InputError(where, "expected at least one character")
            return self._encode_text(seq, where)
        if not isinstance(seq, (list, tuple)) or not seq:
            raise InputError(where, "expected a non-empty list of token ids")
        vocab = self.task_info.vocab_size
        assert vocab is not None
        for j, token in enumerate(seq):
            if isinstance(token, bool) or not isinstance(token, int):
                raise InputError(f"{where}.{j}", f"expected a token id (an integer), got {token!r}")
            if not 0 <= token < vocab:
                raise InputError(
                    f"{where}.{j}", f"expected a token id in [0, {vocab}), got {token}"
                )
        return torch.tensor(seq, dtype=torch.long)

    def _encode_text(self, text: str, where: str) -> Tensor:
        assert self._char_index is not None
        ids = []
        for j, char in enumerate(text):
            if char not in self._char_index:
                raise InputError(f"{where}.{j}", f"character {char!r} is not in the vocabulary")
            ids.append(self._char_index[char])
        return torch.tensor(ids, dtype=torch.long)

    def _encode_features(self, seq: Any, where: str) -> Tensor:
        size = self.task_info.input_size
        assert size is not None
        if not isinstance(seq, (list, tuple)) or not seq:
            raise InputError(where, "expected a non-empty list of feature vectors")
        rows = []
        for j, step in enumerate(seq):
            vector = [step] if size == 1 and not isinstance(step, (list, tuple)) else step
            if not isinstance(vector, (list, tuple)):
                raise InputError(f"{where}.{j}", f"expected a list of {size} numbers, got {step!r}")
            if len(vector) != size:
                raise InputError(f"{where}.{j}", f"expected {size} features, got {len(vector)}")
            for k, value in enumerate(vector):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"{where}.{j}.{k}", f"expected a number, got {value!r}")
                if not math.isfinite(value):
                    raise InputError(f"{where}.{j}.{k}", f"expected a finite number, got {value}")
            rows.append(vector)
        x = torch.tensor(rows, dtype=torch.float32)
        permutation = self.task_info.extra.get("input_permutation")
        if permutation is not None:  # permuted MNIST: clients send images in raster order
            if len(x) != len(permutation):
                raise InputError(where, f"expected {len(permutation)} steps, got {len(x)}")
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
                    probs = torch.softmax(last / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                out.append(vocabulary[token])
                x = torch.tensor([[token]], device=self.device)
                logits, hx = self.model(x, hx=hx)
        return "".join(out)
