"""The predictor: an LRU cache of loaded models and request validation against each model.

Every request is checked against the model's task before the model is touched: the number of
sequences and their lengths (limits from settings), tokens inside the vocabulary, the feature size
of every step, finite numbers. A bad request raises :class:`kru_core.errors.InputError` naming the
offending value (``inputs.3.17``), which the API answers with a ``422``. Checkpoint paths come from
the model registry (:func:`worker.service.get_model`), never from the client.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kru_core.errors import InputError
from kru_core.inference import LoadedModel

Loader = Callable[[Path], LoadedModel]
Resolver = Callable[[str], Path]


def _load_on_cpu(checkpoint: Path) -> LoadedModel:
    return LoadedModel.from_checkpoint(checkpoint, device="cpu")


class ModelCache:
    """A thread-safe LRU cache of loaded models, keyed by model id.

    Two requests for the same model that is not loaded yet load it once; requests for other,
    cached models are not held up by a load. Models never change once registered, so a cached
    one is served without asking the registry again.

    Args:
        capacity: models kept; the least recently used is dropped beyond it.
        resolve: the checkpoint directory of a model id (raises for an unknown id).
        loader: loads a checkpoint directory (default: on the CPU).
    """

    def __init__(self, capacity: int, *, resolve: Resolver, loader: Loader = _load_on_cpu) -> None:
        if capacity < 1:
            raise ValueError(f"expected a capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._resolve = resolve
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, model_id: object) -> bool:
        with self._lock:
            return model_id in self._models

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model ``model_id``, resolving and loading its checkpoint on a miss."""
        with self._lock:
            model = self._hit(model_id)
            if model is not None:
                return model
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        with load_lock:
            with self._lock:
                model = self._hit(model_id)
            if model is not None:
                return model
            try:
                model = self._loader(self._resolve(model_id))
            finally:
                with self._lock:
                    self._loading.pop(model_id, None)
            with self._lock:
                self._models[model_id] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        return model

    def _hit(self, model_id: str) -> LoadedModel | None:
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
        return model


class Predictor:
    """Validates prediction and generation requests and runs them on cached models.

    Args:
        resolve: the checkpoint directory of a model id; raises ``NotFound`` for an unknown id
            (the API passes the model registry's lookup).
        cache_size: models kept loaded (``KRU_MODEL_CACHE_SIZE``).
        max_sequences: sequences per predict request (``KRU_MAX_SEQUENCES_PER_REQUEST``).
        max_sequence_length: steps per sequence, prompt characters and new characters per
            generate request (``KRU_MAX_SEQUENCE_LENGTH``).
        loader: loads a checkpoint directory (default: ``LoadedModel.from_checkpoint`` on CPU).
    """

    def __init__(
        self,
        resolve: Resolver,
        *,
        cache_size: int,
        max_sequences: int,
        max_sequence_length: int,
        loader: Loader = _load_on_cpu,
    ) -> None:
        self.cache = ModelCache(cache_size, resolve=resolve, loader=loader)
        self.max_sequences = max_sequences
        self.max_sequence_length = max_sequence_length

    def predict(
        self, model_id: str, inputs: Sequence[Sequence[Any]], *, probabilities: bool = False
    ) -> dict[str, Any]:
        """``{"predictions": [...], "probabilities"?: [...]}`` for ``inputs``; or InputError."""
        model = self.cache.get(model_id)
        validate_inputs(
            inputs,
            model.info,
            max_sequences=self.max_sequences,
            max_length=self.max_sequence_length,
        )
        with torch.inference_mode():
            return model.predict(inputs, probabilities=probabilities)

    def generate(
        self,
        model_id: str,
        prompt: str,
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> str:
        """Text continuing ``prompt``; InputError for a non-text model or a bad prompt."""
        model = self.cache.get(model_id)
        validate_prompt(
            prompt, model.info, max_new_tokens=max_new_tokens, max_length=self.max_sequence_length
        )
        with torch.inference_mode():
            return model.generate(
                prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            )


def validate_inputs(
    inputs: Sequence[Any],
    info: Mapping[str, Any],
    *,
    max_sequences: int,
    max_length: int,
) -> None:
    """Check ``inputs`` against a model's ``info``; raise InputError naming the culprit.

    Token models (``input_kind`` ``tokens``) take lists of ints in ``[0, vocab_size)``, and text
    models also strings of vocabulary characters; feature models take lists of ``input_size``
    finite numbers per step (plain numbers when ``input_size`` is 1).
    """
    if len(inputs) > max_sequences:
        raise InputError("inputs", f"expected at most {max_sequences} sequences, got {len(inputs)}")
    tokens = info.get("input_kind") == "tokens"
    for i, sequence in enumerate(inputs):
        where = f"inputs.{i}"
        if len(sequence) == 0:
            raise InputError(where, "expected at least one step, got an empty sequence")
        if len(sequence) > max_length:
            raise InputError(where, f"expected at most {max_length} steps, got {len(sequence)}")
        if tokens and isinstance(sequence, str):
            _check_text(sequence, where, info.get("vocabulary"))
        elif tokens:
            _check_tokens(sequence, where, int(info["vocab_size"]))
        else:
            _check_features(sequence, where, int(info["input_size"]))


def _check_text(text: str, where: str, vocabulary: Sequence[str] | None) -> None:
    if not vocabulary:
        raise InputError(where, "expected a list of tokens: only text models take strings")
    known = set(vocabulary)
    for j, char in enumerate(text):
        if char not in known:
            raise InputError(f"{where}.{j}", f"character {char!r} is not in the model's vocabulary")


def _check_tokens(sequence: Sequence[Any], where: str, vocab_size: int) -> None:
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
    for j, step in enumerate(sequence):
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


def validate_prompt(
    prompt: str, info: Mapping[str, Any], *, max_new_tokens: int, max_length: int
) -> None:
    """Check a generation request against a model's ``info``; raise InputError.

    Only text models generate; the prompt must be at most ``max_length`` characters from the
    model's vocabulary, and ``max_new_tokens`` at most ``max_length``.
    """
    if info.get("task_kind") != "text":
        raise InputError(
            "model_id",
            f"generate needs a text model, this one was trained on task "
            f"{info.get('task_kind')!r}: use /predict",
        )
    if len(prompt) > max_length:
        raise InputError("prompt", f"expected at most {max_length} characters, got {len(prompt)}")
    if max_new_tokens > max_length:
        raise InputError("max_new_tokens", f"expected at most {max_length}, got {max_new_tokens}")
    vocabulary = set(info.get("vocabulary") or ())
    for position, char in enumerate(prompt):
        if char not in vocabulary:
            raise InputError(
                f"prompt.{position}", f"character {char!r} is not in the model's vocabulary"
            )
