"""A typed Python client of the kru HTTP API (httpx + pydantic; it never imports the server).

Example::

    from kru_client import Client

    with Client("http://127.0.0.1:8000") as kru:
        job = kru.submit_job({"task": {"kind": "copy", "delay": 10}}, name="copy-demo")
        job = kru.wait(job.id)
        print(kru.predict(job.model_id, [[3, 1, 4, 1, 5, 2, 6, 5, 3, 5, *[0] * 9, 9, *[0] * 10]]))
"""

from kru_client.client import AsyncClient, Client
from kru_client.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    KruApiError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from kru_client.models import (
    Dataset,
    Event,
    GenerateResponse,
    Job,
    JobSpec,
    MetricPoint,
    Model,
    ModelSpec,
    PredictResponse,
    TaskSpec,
    TrainSpec,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "Dataset",
    "Event",
    "Forbidden",
    "GenerateResponse",
    "InvalidInput",
    "Job",
    "JobSpec",
    "KruApiError",
    "MetricPoint",
    "Model",
    "ModelSpec",
    "NotFound",
    "PayloadTooLarge",
    "PredictResponse",
    "ServiceUnavailable",
    "TaskSpec",
    "TooManyRequests",
    "TrainSpec",
    "Unauthorized",
]
