"""FastAPI dependencies and their ``Annotated`` aliases (``SettingsDep``, ``PredictorDep``, ...).

The app's long-lived objects live on ``app.state`` (set by :func:`app.main.create_app`); routes
reach them through these aliases rather than module globals, so several apps (tests) can coexist.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from app.auth import OPEN_KEY_NAME
from app.errors import echo
from app.metrics import ApiMetrics
from app.predictor import Predictor
from worker.errors import NotFound
from worker.ids import is_id
from worker.settings import Settings


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_predictor(request: Request) -> Predictor:
    """The app's predictor (model cache)."""
    return request.app.state.predictor


def get_metrics(request: Request) -> ApiMetrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics


def get_api_key_name(request: Request) -> str:
    """The name of the request's API key (set by :class:`app.auth.ApiKeyMiddleware`;
    :data:`app.auth.OPEN_KEY_NAME` while the API is open): the owner of what it creates."""
    return str(getattr(request.state, "api_key", OPEN_KEY_NAME))


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
#: The name of the request's API key.
KeyName = Annotated[str, Depends(get_api_key_name)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def checked_id(kind: str, value: str) -> str:
    """``value`` if it has the shape of an id, else ``NotFound`` (``"job 'x' not found"``; a
    long value is echoed cut, :func:`app.errors.echo`)."""
    # Ids are made by the store (worker.ids); anything else names nothing. Checking the shape
    # here answers 404 at once and keeps odd bytes (NUL, huge strings) away from the database.
    if not is_id(value):
        raise NotFound(f"{kind} {echo(value)} not found")
    return value


def _job_id(job_id: Annotated[str, Path(description="a job id")]) -> str:
    return checked_id("job", job_id)


def _dataset_id(dataset_id: Annotated[str, Path(description="a dataset id")]) -> str:
    return checked_id("dataset", dataset_id)


def _model_id(model_id: Annotated[str, Path(description="a model id")]) -> str:
    return checked_id("model", model_id)


JobId = Annotated[str, Depends(_job_id)]
DatasetId = Annotated[str, Depends(_dataset_id)]
ModelId = Annotated[str, Depends(_model_id)]
