"""``/v1/datasets``: upload (multipart, deduplicated per key), list, describe and delete
datasets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, Security, UploadFile

from app.auth import bearer_scheme
from app.deps import DatasetId, KeyName
from app.errors import ErrorRoute
from app.schemas import Dataset, DatasetList, PageQuery, error_responses
from worker import service

router = APIRouter(
    route_class=ErrorRoute,
    prefix="/datasets",
    tags=["datasets"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


@router.post(
    "",
    status_code=201,
    response_model=Dataset,
    responses={
        200: {"model": Dataset, "description": "The key already stored these bytes: that one"},
        **error_responses(413, 422, 429, 507),
    },
)
def upload_dataset(
    file: Annotated[
        UploadFile,
        File(description="JSONL (one {'input': [...], 'target': ...} a line) or UTF-8 text"),
    ],
    key: KeyName,
    response: Response,
    kind: Annotated[
        Literal["jsonl", "text"] | None,
        Form(description="jsonl or text; default: from the file name (.jsonl/.json: jsonl)"),
    ] = None,
) -> Dataset:
    """Upload a dataset file (multipart field ``file``); it is validated, then stored. The same
    bytes uploaded again with the same key answer ``200`` with the stored dataset."""
    content = file.file.read()
    view, created = service.upload_dataset(file.filename or "", content, kind=kind, owner=key)
    if not created:
        response.status_code = 200
    return Dataset.model_validate(view)


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409))
def delete_dataset(dataset_id: DatasetId, key: KeyName) -> Response:
    """Delete one of the key's datasets (``409`` while a queued or running job uses it)."""
    service.delete_dataset(dataset_id, owner=key)
    return Response(status_code=204)


@router.get("", response_model=DatasetList, responses=error_responses(422))
def list_datasets(query: Annotated[PageQuery, Query()]) -> DatasetList:
    """List uploaded datasets, newest first."""
    return DatasetList.listed(service.list_datasets, query)


@router.get("/{dataset_id}", response_model=Dataset, responses=error_responses(404))
def get_dataset(dataset_id: DatasetId) -> Dataset:
    """Describe a dataset: kind, size, checksum and what validation found."""
    return Dataset.model_validate(service.get_dataset(dataset_id))
