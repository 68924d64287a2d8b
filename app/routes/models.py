"""``/v1/models``: trained models, predictions and text generation."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, Security

from app.auth import bearer_scheme
from app.deps import KeyName, MetricsDep, ModelId, PredictorDep, checked_id
from app.errors import ErrorRoute
from app.predictor import disconnect_waiter
from app.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Model,
    ModelList,
    PageQuery,
    PredictRequest,
    PredictResponse,
    error_responses,
)
from worker import service

#: The answers of a request that waits for a model (micro-batching, app/predictor.py).
SERVING_RESPONSES: dict[int | str, dict[str, object]] = {
    500: {"model": ErrorResponse, "description": "The forward pass of the request's batch failed"},
    503: {
        "model": ErrorResponse,
        "description": "The model's queue is full (KRU_BATCH_QUEUE_SIZE); see Retry-After",
    },
    504: {"model": ErrorResponse, "description": "No answer within KRU_PREDICT_TIMEOUT"},
}

router = APIRouter(
    route_class=ErrorRoute,
    prefix="/models",
    tags=["models"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


@router.get("", response_model=ModelList, responses=error_responses(422))
def list_models(query: Annotated[PageQuery, Query()]) -> ModelList:
    """List trained models, newest first."""
    return ModelList.listed(service.list_models, query)


@router.get("/{model_id}", response_model=Model, responses=error_responses(404))
def get_model(model_id: ModelId) -> Model:
    """Describe a model: config, task, metrics, parameter counts and source job."""
    return Model.model_validate(service.get_model(model_id))


@router.delete("/{model_id}", status_code=204, responses=error_responses(404, 409))
def delete_model(model_id: ModelId, key: KeyName, predictor: PredictorDep) -> Response:
    """Delete a model of one of the key's jobs and its checkpoint files; the job stays, without
    a model (``409`` while a streaming session is open on it); another key's model is a
    ``404``. Predictions on it answer ``404`` from then on (an API replica that has it loaded
    keeps it until it leaves that replica's cache)."""
    service.delete_model(model_id, owner=key)
    predictor.cache.forget(model_id)
    return Response(status_code=204)


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,  # "probabilities" only when asked for
    responses={**error_responses(404, 413, 422), **SERVING_RESPONSES},
)
async def predict(
    model_id: Annotated[str, Path(description="a model id")],
    body: PredictRequest,
    request: Request,
) -> PredictResponse:
    """Predict: one label per step (copy, labelling, text) or one value per sequence.

    Concurrent requests for the same model are merged into one forward pass."""
    # No sync dependencies here: FastAPI runs each in the thread pool, a thread hop apiece.
    model_id = checked_id("model", model_id)
    state = request.app.state
    start = time.perf_counter()
    result = await state.predictor.predict_async(
        model_id,
        body.inputs,
        probabilities=body.probabilities,
        disconnected=disconnect_waiter(request.receive),
    )
    state.metrics.predict_latency.labels("predict").observe(time.perf_counter() - start)
    return PredictResponse(
        model_id=model_id,
        predictions=result["predictions"],
        probabilities=result.get("probabilities") if body.probabilities else None,
    )


@router.post(
    "/{model_id}/generate",
    response_model=GenerateResponse,
    responses=error_responses(404, 413, 422),
)
async def generate(
    model_id: ModelId, body: GenerateRequest, predictor: PredictorDep, metrics: MetricsDep
) -> GenerateResponse:
    """Generate text from a character-level model (task ``text``; other models: 422)."""
    start = time.perf_counter()
    text = await predictor.generate_async(
        model_id,
        body.prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        seed=body.seed,
    )
    metrics.predict_latency.labels("generate").observe(time.perf_counter() - start)
    return GenerateResponse(model_id=model_id, prompt=body.prompt, text=text)
