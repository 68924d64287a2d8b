"""``/v1/models``: trained models, predictions and text generation."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Security

from app.auth import bearer_scheme
from app.deps import MetricsDep, ModelId, PredictorDep
from app.schemas import (
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

router = APIRouter(
    prefix="/models",
    tags=["models"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


@router.get("", response_model=ModelList, responses=error_responses(422))
def list_models(query: Annotated[PageQuery, Query()]) -> ModelList:
    """List trained models, newest first."""
    return ModelList.model_validate(service.list_models(limit=query.limit, offset=query.offset))


@router.get("/{model_id}", response_model=Model, responses=error_responses(404))
def get_model(model_id: ModelId) -> Model:
    """Describe a model: config, task, metrics, parameter counts and source job."""
    return Model.model_validate(service.get_model(model_id))


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,  # "probabilities" only when asked for
    responses=error_responses(404, 413, 422),
)
def predict(
    model_id: ModelId, body: PredictRequest, predictor: PredictorDep, metrics: MetricsDep
) -> PredictResponse:
    """Predict: one label per step (copy, labelling, text) or one value per sequence."""
    start = time.perf_counter()
    result = predictor.predict(model_id, body.inputs, probabilities=body.probabilities)
    metrics.predict_latency.labels("predict").observe(time.perf_counter() - start)
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
def generate(
    model_id: ModelId, body: GenerateRequest, predictor: PredictorDep, metrics: MetricsDep
) -> GenerateResponse:
    """Generate text from a character-level model (task ``text``; other models: 422)."""
    start = time.perf_counter()
    text = predictor.generate(
        model_id,
        body.prompt,
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        seed=body.seed,
    )
    metrics.predict_latency.labels("generate").observe(time.perf_counter() - start)
    return GenerateResponse(model_id=model_id, prompt=body.prompt, text=text)
