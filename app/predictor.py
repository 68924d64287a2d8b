"""The predictor: an LRU cache of loaded models, request validation, and dynamic micro-batching.

Every request is checked against the model's task before the model is touched: the number of
sequences and their lengths (limits from settings), tokens inside the vocabulary, the feature size
of every step, finite numbers within float32's range, the request's cost. A bad request raises
:class:`kru_core.errors.InputError` naming the offending value (``inputs.3.17``), which the API
answers with a ``422``. Checkpoint paths come from the model registry
(:func:`worker.service.get_model`), never from the client.

Valid requests then join their model's queue (:class:`ModelBatcher`): concurrent requests (and
streaming-session steps, in a queue of their own) are merged into one forward pass of at most
``batch_max_size`` sequences, waiting at most ``batch_max_delay`` seconds for more once the
first one is queued (requests that arrive while a batch runs make up the next one). The forward
pass runs in a worker thread, or on the event loop when it is expected to take at most
``inline_forward`` seconds (at the last pass's rate) and the model is loaded and idle. Each
queue holds at most ``queue_size`` requests (more: :class:`Overloaded`, a ``503`` with
``Retry-After``); a request waits at most ``timeout`` seconds (:class:`DeadlineExceeded`,
``504``), and one whose client hung up is dropped from its queue (:class:`ClientDisconnected`).
A sequence whose outputs are not finite fails only its own request (``422``); an exception in a
forward pass fails only that batch (:class:`BatchFailed`, ``500`` naming the error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kru_core.errors import InputError
from kru_core.inference import (
    NON_FINITE_OUTPUT,
    BatchOutput,
    LoadedModel,
    ModelBusy,
    check_inputs,
)
from kru_core.tasks import TaskInfo

logger = logging.getLogger(__name__)

Loader = Callable[[Path], LoadedModel]
Resolver = Callable[[str], Path]

#: Requests with at most this many steps in all are validated on the event loop (microseconds);
#: larger ones in a thread, so a 1 MB body does not hold up other requests.
INLINE_VALIDATION_STEPS = 2048
#: A model's batcher task ends after this many idle seconds (and is made again on demand).
BATCHER_IDLE_SECONDS = 60.0


class Overloaded(Exception):
    """The model's queue is full: answered ``503`` with ``Retry-After``."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request was not answered within its deadline: answered ``504``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ClientDisconnected(Exception):
    """The client hung up before the answer; its work was dropped (logged as ``499``)."""


class BatchFailed(Exception):
    """A forward pass raised: every request of that batch (and only those) fails, ``500``."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


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

    def peek(self, model_id: str) -> LoadedModel | None:
        """The loaded model ``model_id``, or ``None`` when it is not loaded (never loads)."""
        with self._lock:
            return self._hit(model_id)

    def forget(self, model_id: str) -> None:
        """Drop ``model_id`` (a deleted model): the next request resolves it again."""
        with self._lock:
            self._models.pop(model_id, None)

    def _hit(self, model_id: str) -> LoadedModel | None:
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
        return model


@dataclass(frozen=True)
class ServingLimits:
    """The predictor's limits and batching (the ``KRU_*`` settings named in brackets).

    Attributes:
        max_sequences: sequences per predict request (``KRU_MAX_SEQUENCES_PER_REQUEST``).
        max_sequence_length: steps per sequence, prompt characters and new characters per
            generate request (``KRU_MAX_SEQUENCE_LENGTH``).
        max_cost: sequences x steps x the model's per-step cost (multiply-adds,
            :func:`kru_core.inference.estimate_step_cost`) per request
            (``KRU_MAX_REQUEST_COST``).
        batch_max_size: sequences merged into one forward pass (``KRU_BATCH_MAX_SIZE``).
        batch_max_delay: seconds the first queued request waits for more
            (``KRU_BATCH_MAX_DELAY_MS`` / 1000).
        queue_size: requests waiting per model and kind (``KRU_BATCH_QUEUE_SIZE``).
        timeout: seconds a request may wait for its answer (``KRU_PREDICT_TIMEOUT``).
        inline_forward: a forward pass expected to take at most this many seconds runs on the
            event loop instead of a worker thread (``KRU_INLINE_FORWARD_MS`` / 1000; 0: never).
    """

    max_sequences: int = 256
    max_sequence_length: int = 10_000
    max_cost: float = 2e11
    batch_max_size: int = 64
    batch_max_delay: float = 0.0
    queue_size: int = 256
    timeout: float = 30.0
    inline_forward: float = 0.001


@dataclass
class Job:
    """Encoded sequences of one request (or one session step) waiting in a batch queue."""

    sequences: list[Tensor]
    probabilities: bool = False
    states: list[Any] | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    future: asyncio.Future[BatchOutput] | None = None
    dropped: bool = False


class ModelBatcher:
    """The queue of one model (and kind: ``predict`` or ``session``) and the task draining it.

    Jobs are taken in arrival order until ``batch_max_size`` sequences (a job larger than that
    runs alone); dropped jobs (deadline, client gone) are skipped. Each batch runs as one
    :meth:`LoadedModel.forward_batch`, in the predictor's executor or, when short (see
    :meth:`Predictor.expected_seconds`), on the event loop, and its outputs are split back to
    the jobs in order.
    """

    def __init__(self, predictor: Predictor, model_id: str, kind: str) -> None:
        self.predictor = predictor
        self.model_id = model_id
        self.kind = kind
        self.loop = asyncio.get_running_loop()
        self.queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self.task = self.loop.create_task(self._run(), name=f"batcher-{kind}-{model_id}")

    def submit(self, job: Job) -> asyncio.Future[BatchOutput]:
        """Queue ``job``; :class:`Overloaded` when ``queue_size`` jobs already wait."""
        limits = self.predictor.limits
        waiting = sum(1 for j in self.queue if not j.dropped)
        if waiting >= limits.queue_size:
            retry = max(1, math.ceil(self.predictor.batch_seconds(self.model_id) * 2))
            raise Overloaded(
                f"model {self.model_id!r} is busy: {waiting} requests are queued (the limit is "
                f"KRU_BATCH_QUEUE_SIZE={limits.queue_size}); retry in {retry} s",
                retry,
            )
        job.future = self.loop.create_future()
        self.queue.append(job)
        self._wakeup.set()
        return job.future

    async def _run(self) -> None:
        limits = self.predictor.limits
        while True:
            if not self.queue:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), BATCHER_IDLE_SECONDS)
                except TimeoutError:
                    if not self.queue:
                        self.predictor._forget(self)
                        return
                continue
            batch: list[Job] = []
            size = 0
            close = self.queue[0].enqueued + limits.batch_max_delay
            while True:
                while self.queue:
                    job = self.queue[0]
                    if job.dropped or job.future is None or job.future.done():
                        self.queue.popleft()
                        continue
                    if batch and size + len(job.sequences) > limits.batch_max_size:
                        break
                    self.queue.popleft()
                    batch.append(job)
                    size += len(job.sequences)
                full = size >= limits.batch_max_size or bool(self.queue)
                remaining = close - time.perf_counter()
                if full or remaining <= 0 or not batch:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            if batch:
                await self._forward(batch, size)

    async def _forward(self, batch: list[Job], size: int) -> None:
        started = time.perf_counter()
        for job in batch:
            self.predictor.observe_wait(self.kind, started - job.enqueued)
        self.predictor.observe_batch(self.kind, size)
        try:
            outputs = self._inline(batch)
            inline = outputs is not None
            if outputs is None:
                outputs = await self.loop.run_in_executor(
                    self.predictor.executor, self.predictor._run_batch, self.model_id, self.kind,
                    batch,
                )  # fmt: skip
        except Exception as exc:  # the whole batch fails, and only it
            logger.exception("forward pass of %d sequences on model %s failed", size, self.model_id)
            failure = BatchFailed(
                f"the forward pass of this request's batch failed: {type(exc).__name__}: {exc}"
            )
            for job in batch:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(failure)
            return
        self.predictor.record_batch_seconds(self.model_id, time.perf_counter() - started)
        for job, output in zip(batch, outputs, strict=True):
            if job.future is not None and not job.future.done():
                job.future.set_result(output)
        if inline:
            await asyncio.sleep(0)  # the answered requests send their answers before the next pass

    def _inline(self, batch: list[Job]) -> list[BatchOutput] | None:
        """The batch's outputs computed here on the event loop when that is cheap: the pass is
        expected within ``inline_forward`` seconds and the model is loaded and idle (no load, no
        wait on another thread's pass or generation); else ``None``."""
        predictor = self.predictor
        expected = predictor.expected_seconds(
            self.model_id, self.kind, padded_steps(s for job in batch for s in job.sequences)
        )
        model = predictor.cache.peek(self.model_id)
        if model is None or expected > predictor.limits.inline_forward:
            return None
        # Short enough to run here: the hand-off to a thread and back (two wake-ups and the GIL
        # changing hands) cost about as much as such a pass.
        try:
            return predictor._run_batch(self.model_id, self.kind, batch, model=model, wait=False)
        except ModelBusy:
            return None


class Predictor:
    """Validates prediction and generation requests and runs them on cached models.

    Args:
        resolve: the checkpoint directory of a model id; raises ``NotFound`` for an unknown id
            (the API passes the model registry's lookup).
        cache_size: models kept loaded (``KRU_MODEL_CACHE_SIZE``).
        max_sequences, max_sequence_length: request limits (see :class:`ServingLimits`); or
        limits: all of them at once.
        loader: loads a checkpoint directory (default: ``LoadedModel.from_checkpoint`` on CPU).
        observe_batch: called with ``(kind, sequences)`` for each forward pass (metrics).
        observe_wait: called with ``(kind, seconds)`` for each job's time in its queue.
        threads: worker threads running forward passes (models run in parallel up to it).
    """

    def __init__(
        self,
        resolve: Resolver,
        *,
        cache_size: int,
        max_sequences: int | None = None,
        max_sequence_length: int | None = None,
        limits: ServingLimits | None = None,
        loader: Loader = _load_on_cpu,
        observe_batch: Callable[[str, int], None] | None = None,
        observe_wait: Callable[[str, float], None] | None = None,
        threads: int = 4,
    ) -> None:
        limits = limits or ServingLimits()
        overrides: dict[str, Any] = {}
        if max_sequences is not None:
            overrides["max_sequences"] = max_sequences
        if max_sequence_length is not None:
            overrides["max_sequence_length"] = max_sequence_length
        if overrides:
            limits = ServingLimits(**{**limits.__dict__, **overrides})
        self.limits = limits
        self.cache = ModelCache(cache_size, resolve=resolve, loader=loader)
        self._threads = threads
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._executors_lock = threading.Lock()
        self._batchers: dict[tuple[str, str], ModelBatcher] = {}
        self._batch_seconds: dict[str, float] = {}
        self._step_seconds: dict[tuple[str, str], float] = {}
        self._observe_batch = observe_batch
        self._observe_wait = observe_wait

    def _pool(self, name: str, threads: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._executors_lock:
            pool = self._executors.get(name)
            if pool is None:
                pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
                self._executors[name] = pool
            return pool

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The threads of forward passes and generation (made on first use, again after
        :meth:`close`)."""
        return self._pool("kru-forward", self._threads)

    @property
    def _validator(self) -> concurrent.futures.ThreadPoolExecutor:
        return self._pool("kru-check", 2)

    @property
    def max_sequences(self) -> int:
        """Sequences per predict request."""
        return self.limits.max_sequences

    @property
    def max_sequence_length(self) -> int:
        """Steps per sequence."""
        return self.limits.max_sequence_length

    # -- synchronous (CLI, tests) ------------------------------------------------------------

    def predict(
        self, model_id: str, inputs: Sequence[Sequence[Any]], *, probabilities: bool = False
    ) -> dict[str, Any]:
        """``{"predictions": [...], "probabilities"?: [...]}`` for ``inputs``, unbatched (in
        the calling thread); or InputError."""
        model = self.cache.get(model_id)
        sequences = self.prepare(model, inputs, probabilities=probabilities)
        output = model.forward_batch(sequences, probabilities=probabilities)
        return answer(output, probabilities=model.wants_probabilities(probabilities))

    # -- asynchronous, batched (the API) ------------------------------------------------------

    async def model(self, model_id: str) -> LoadedModel:
        """The loaded model (loading it in a thread on a cache miss)."""
        if model_id in self.cache:
            return self.cache.get(model_id)
        return await asyncio.get_running_loop().run_in_executor(
            self._validator, self.cache.get, model_id
        )

    async def prepare_async(
        self,
        model: LoadedModel,
        inputs: Sequence[Any],
        *,
        probabilities: bool = False,
    ) -> list[Tensor]:
        """:meth:`prepare`, on the event loop for small requests and in a thread for large."""
        steps = sum(len(s) if isinstance(s, (list, str)) else 1 for s in inputs)
        if steps <= INLINE_VALIDATION_STEPS:
            return self.prepare(model, inputs, probabilities=probabilities)
        return await asyncio.get_running_loop().run_in_executor(
            self._validator, lambda: self.prepare(model, inputs, probabilities=probabilities)
        )

    def prepare(
        self,
        model: LoadedModel,
        inputs: Sequence[Any],
        *,
        probabilities: bool = False,
    ) -> list[Tensor]:
        """Validate a request against ``model`` and the limits; its sequences as tensors.

        Raises:
            InputError: a bad value, a limit (``KRU_MAX_*``), ``probabilities`` on a
                regression model, or a cost over ``KRU_MAX_REQUEST_COST``.
        """
        validate_inputs(
            inputs,
            model.task_info,
            max_sequences=self.limits.max_sequences,
            max_length=self.limits.max_sequence_length,
        )
        if probabilities and model.task_info.target_kind != "classification":
            raise InputError(
                "probabilities",
                f"this model predicts values (task {model.task_info.task_kind!r}, "
                "regression): it has no probabilities",
            )
        self.check_cost(model, sum(len(s) for s in inputs), len(inputs), field="inputs")
        return model.encode(inputs, checked=True)  # validate_inputs ran check_inputs

    def check_cost(self, model: LoadedModel, steps: int, sequences: int, *, field: str) -> None:
        """InputError when ``steps`` (all sequences' steps) x the model's per-step cost is over
        ``KRU_MAX_REQUEST_COST``."""
        cost = steps * model.step_cost
        if cost > self.limits.max_cost:
            raise InputError(
                field,
                f"request cost {cost:.3g} is over the limit KRU_MAX_REQUEST_COST="
                f"{self.limits.max_cost:.3g} ({sequences} sequences, {steps} steps in all, x "
                f"{model.step_cost} multiply-adds per step of this model): send fewer or shorter "
                "sequences",
            )

    async def run(
        self,
        model_id: str,
        job: Job,
        *,
        kind: str = "predict",
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> BatchOutput:
        """Queue ``job`` on the model's batcher and wait for its outputs.

        Args:
            kind: ``predict`` or ``session`` (batched separately: sessions carry states).
            disconnected: an awaitable factory that returns once the client hung up.

        Raises:
            Overloaded, DeadlineExceeded, ClientDisconnected, BatchFailed.
        """
        batcher = self._batcher(model_id, kind)
        future = batcher.submit(job)
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waits: set[asyncio.Future[Any]] = {future} | ({watcher} if watcher else set())
        try:
            done, _ = await asyncio.wait(
                waits, timeout=self.limits.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if watcher is not None:
                watcher.cancel()
        if future in done:
            return future.result()
        job.dropped = True
        future.cancel()
        if watcher is not None and watcher in done:
            raise ClientDisconnected()
        raise DeadlineExceeded(
            f"no answer within the request deadline (KRU_PREDICT_TIMEOUT={self.limits.timeout:g}"
            f" s): model {model_id!r} is busy"
        )

    async def predict_async(
        self,
        model_id: str,
        inputs: Sequence[Any],
        *,
        probabilities: bool = False,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> dict[str, Any]:
        """:meth:`predict`, batched with concurrent requests for the same model."""
        model = await self.model(model_id)
        sequences = await self.prepare_async(model, inputs, probabilities=probabilities)
        output = await self.run(model_id, Job(sequences, probabilities), disconnected=disconnected)
        return answer(output, probabilities=model.wants_probabilities(probabilities))

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
            prompt,
            model.info,
            max_new_tokens=max_new_tokens,
            max_length=self.limits.max_sequence_length,
        )
        self.check_cost(model, len(prompt) + max_new_tokens, 1, field="max_new_tokens")
        with torch.inference_mode():
            return model.generate(
                prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            )

    async def generate_async(self, model_id: str, prompt: str, **kwargs: Any) -> str:
        """:meth:`generate` in a worker thread (never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: self.generate(model_id, prompt, **kwargs)
        )

    # -- batchers ----------------------------------------------------------------------------

    def _batcher(self, model_id: str, kind: str) -> ModelBatcher:
        key = (model_id, kind)
        batcher = self._batchers.get(key)
        loop = asyncio.get_running_loop()
        if batcher is None or batcher.loop is not loop or batcher.task.done():
            batcher = ModelBatcher(self, model_id, kind)
            self._batchers[key] = batcher
        return batcher

    def _forget(self, batcher: ModelBatcher) -> None:
        key = (batcher.model_id, batcher.kind)
        if self._batchers.get(key) is batcher:
            del self._batchers[key]

    def _run_batch(
        self,
        model_id: str,
        kind: str,
        batch: list[Job],
        *,
        model: LoadedModel | None = None,
        wait: bool = True,
    ) -> list[BatchOutput]:
        """One forward pass over every sequence of ``batch`` (in the executor, or inline with
        ``model`` given and ``wait=False``: :class:`ModelBusy` when the model is in use); the
        pass's own duration is recorded for :meth:`expected_seconds`."""
        model = model if model is not None else self.cache.get(model_id)
        sequences = [s for job in batch for s in job.sequences]
        stateful = any(job.states is not None for job in batch)
        states = None
        if stateful:
            states = [
                s
                for job in batch
                for s in (job.states if job.states is not None else [None] * len(job.sequences))
            ]
        started = time.perf_counter()
        output = model.forward_batch(
            sequences,
            probabilities=any(job.probabilities for job in batch),
            states=states,
            return_states=stateful,
            wait=wait,
        )
        self.record_pass(model_id, kind, time.perf_counter() - started, padded_steps(sequences))
        results, start = [], 0
        for job in batch:
            end = start + len(job.sequences)
            results.append(
                BatchOutput(
                    output.predictions[start:end],
                    output.probabilities[start:end],
                    output.finite[start:end],
                    output.states[start:end],
                )
            )
            start = end
        return results

    def batch_seconds(self, model_id: str) -> float:
        """The last forward pass's duration on ``model_id`` (0 before the first)."""
        return self._batch_seconds.get(model_id, 0.0)

    def record_batch_seconds(self, model_id: str, seconds: float) -> None:
        """Remember a batch's duration, queue hand-offs included (for ``Retry-After``)."""
        self._batch_seconds[model_id] = seconds

    def record_pass(self, model_id: str, kind: str, seconds: float, steps: int) -> None:
        """Remember a forward pass's own duration over ``steps`` :func:`padded_steps` (the rate
        :meth:`expected_seconds` extrapolates)."""
        self._step_seconds[model_id, kind] = seconds / max(1, steps)

    def expected_seconds(self, model_id: str, kind: str, steps: int) -> float:
        """The expected duration of a ``kind`` pass over ``steps`` :func:`padded_steps` at the
        last such pass's rate; infinite before the first one in this process."""
        rate = self._step_seconds.get((model_id, kind))
        return math.inf if rate is None else rate * steps

    def observe_batch(self, kind: str, size: int) -> None:
        """Record a forward pass of ``size`` sequences."""
        if self._observe_batch is not None:
            self._observe_batch(kind, size)

    def observe_wait(self, kind: str, seconds: float) -> None:
        """Record a job's time in its queue."""
        if self._observe_wait is not None:
            self._observe_wait(kind, seconds)

    def close(self) -> None:
        """Stop the worker threads (after the running forward passes)."""
        with self._executors_lock:
            pools, self._executors = list(self._executors.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)


def padded_steps(sequences: Iterable[Tensor]) -> int:
    """The steps a forward pass over ``sequences`` computes: rows x the longest (shorter ones
    are padded to it)."""
    lengths = [len(s) for s in sequences]
    return len(lengths) * max(lengths, default=0)


def answer(output: BatchOutput, *, probabilities: bool) -> dict[str, Any]:
    """The JSON of a predict answer from one request's outputs; InputError for a sequence
    whose outputs are not finite."""
    for i, finite in enumerate(output.finite):
        if not finite:
            raise InputError(f"inputs.{i}", NON_FINITE_OUTPUT)
    result: dict[str, Any] = {"predictions": output.predictions}
    if probabilities:
        result["probabilities"] = output.probabilities
    return result


def validate_inputs(
    inputs: Sequence[Any],
    info: TaskInfo,
    *,
    max_sequences: int,
    max_length: int,
) -> None:
    """The service's limits (``KRU_MAX_SEQUENCES_PER_REQUEST``, ``KRU_MAX_SEQUENCE_LENGTH``),
    then kru_core's checks of every value (:func:`kru_core.inference.check_inputs`); raise
    InputError naming the culprit."""
    if isinstance(inputs, (list, tuple)):
        if len(inputs) > max_sequences:
            raise InputError(
                "inputs", f"expected at most {max_sequences} sequences, got {len(inputs)}"
            )
        for i, sequence in enumerate(inputs):
            if isinstance(sequence, (list, tuple, str)) and len(sequence) > max_length:
                raise InputError(
                    f"inputs.{i}", f"expected at most {max_length} steps, got {len(sequence)}"
                )
    check_inputs(inputs, info)


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


def install_error_handlers(app: Any) -> None:
    """Map the predictor's errors to HTTP on ``app``: ``503`` with ``Retry-After`` (queue
    full), ``429`` with ``Retry-After`` (``KRU_MAX_SESSIONS``), ``504`` (deadline), ``499``
    (client gone; nobody reads it), ``500`` naming the failed forward pass; all in the
    documented error shape."""
    from fastapi.responses import JSONResponse, Response

    from app.errors import error_body

    async def overloaded(request: Any, exc: Overloaded) -> JSONResponse:
        return JSONResponse(
            error_body(exc.detail), status_code=503, headers={"Retry-After": str(exc.retry_after)}
        )

    async def deadline(request: Any, exc: DeadlineExceeded) -> JSONResponse:
        return JSONResponse(error_body(exc.detail), status_code=504)

    async def gone(request: Any, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)

    async def failed(request: Any, exc: BatchFailed) -> JSONResponse:
        return JSONResponse(error_body(exc.detail), status_code=500)

    from app.sessions import TooManySessions

    async def too_many(request: Any, exc: TooManySessions) -> JSONResponse:
        return JSONResponse(
            error_body(exc.detail), status_code=429, headers={"Retry-After": str(exc.retry_after)}
        )

    app.add_exception_handler(TooManySessions, too_many)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(DeadlineExceeded, deadline)
    app.add_exception_handler(ClientDisconnected, gone)
    app.add_exception_handler(BatchFailed, failed)


def disconnect_waiter(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> Callable[[], Any]:
    """An awaitable factory that returns once the client has hung up.

    ``receive`` is the request's ASGI receive after its body was read: the server's next message
    is ``http.disconnect`` (the client closed the connection, or the response was sent).
    """

    async def wait() -> None:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return
        await asyncio.Event().wait()  # more body: no disconnect to expect this way

    return wait
