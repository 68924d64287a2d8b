"""``/v1/workers``: the live worker processes, where they train and what they run."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Security
from pydantic import BaseModel, Field

from app.auth import bearer_scheme
from app.schemas import error_responses, example_config
from worker import service

router = APIRouter(
    prefix="/workers",
    tags=["workers"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)


class Worker(BaseModel):
    """A live worker process (its heartbeat is younger than ``KRU_HEARTBEAT_TIMEOUT``)."""

    model_config = example_config(
        {
            "name": "gpu-node-1:4121",
            "host": "gpu-node-1",
            "pid": 4121,
            "device": "cuda:0",
            "device_name": "NVIDIA H200",
            "memory_bytes": 150_000_000_000,
            "torch_version": "2.13.0+cu130",
            "cuda_version": "13.0",
            "job_id": "8a1f0c3e6b2d4f5a9c7e1b3d5f7a9c0e",
            "started_at": "2026-01-05T10:00:00Z",
            "heartbeat_at": "2026-01-05T10:02:10Z",
        },
        from_attributes=True,
    )

    name: str = Field(description="host:pid, as in a job's worker")
    host: str
    pid: int
    device: str = Field(description="cpu, or cuda:N")
    device_name: str | None = Field(description="the GPU's name, or the CPU model")
    memory_bytes: int | None = Field(description="the GPU's memory (null on CPU)")
    torch_version: str
    cuda_version: str | None = Field(description="the CUDA torch was built with (null: CPU build)")
    job_id: str | None = Field(description="the job it runs now (null: idle)")
    started_at: datetime
    heartbeat_at: datetime = Field(description="its last heartbeat")


class WorkerList(BaseModel):
    """Every live worker, by name."""

    items: list[Worker]


@router.get("", response_model=WorkerList)
def list_workers() -> WorkerList:
    """List the live workers: host, device (CPU or the GPU's name and memory), torch and CUDA
    versions, the job each runs and its last heartbeat."""
    return WorkerList(items=[Worker.model_validate(w) for w in service.list_workers()])
