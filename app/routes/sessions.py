"""Streaming sessions: ``/v1/models/{model_id}/sessions`` and ``/v1/sessions/{session_id}``.

A client streams one sequence in chunks; the model's hidden state carries over between them, so
the chunks get exactly the predictions one ``predict`` of the whole sequence gets. See
:mod:`app.sessions` for the store and the exactly-once rule.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request, Response, Security
from starlette.concurrency import run_in_threadpool

from app import sessions
from app.auth import bearer_scheme
from app.deps import ModelId, PredictorDep, SettingsDep, checked_id
from app.errors import ErrorRoute
from app.predictor import Job, answer, disconnect_waiter
from app.routes.models import SERVING_RESPONSES
from app.schemas import ErrorResponse, error_responses
from app.sessions import (
    SessionCreate,
    SessionInfo,
    SessionPredictRequest,
    SessionPredictResponse,
    chunk_error,
)
from kru_core.errors import InputError

router = APIRouter(
    route_class=ErrorRoute,
    tags=["sessions"],
    dependencies=[Security(bearer_scheme)],
    responses=error_responses(401, 403),
)

_429 = {429: {"model": ErrorResponse, "description": "KRU_MAX_SESSIONS sessions are open"}}


def _session_id(session_id: Annotated[str, Path(description="a session id")]) -> str:
    return checked_id("session", session_id)


SessionId = Annotated[str, Depends(_session_id)]


@router.post(
    "/models/{model_id}/sessions",
    status_code=201,
    response_model=SessionInfo,
    responses={**error_responses(404, 413, 422), **_429},
)
async def create_session(
    model_id: ModelId,
    predictor: PredictorDep,
    settings: SettingsDep,
    body: Annotated[SessionCreate | None, Body()] = None,
) -> dict[str, Any]:
    """Open a streaming session on a model (position 0, zero hidden state)."""
    model = await predictor.model(model_id)
    if model.task_info.extra.get("input_permutation") is not None:
        raise InputError(
            "model_id",
            "this model permutes whole sequences (permuted MNIST): it cannot be streamed in "
            "chunks, use /predict",
        )
    ttl = body.ttl_seconds if body is not None and body.ttl_seconds else settings.session_ttl
    return await run_in_threadpool(
        sessions.create_session, model_id, ttl_seconds=ttl, max_sessions=settings.max_sessions
    )


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=error_responses(404))
async def get_session(session_id: SessionId) -> dict[str, Any]:
    """A session's position and expiry."""
    return await run_in_threadpool(sessions.get_session, session_id)


@router.delete("/sessions/{session_id}", status_code=204, responses=error_responses(404))
async def delete_session(session_id: SessionId) -> Response:
    """Close a session (its state is deleted)."""
    await run_in_threadpool(sessions.delete_session, session_id)
    return Response(status_code=204)


@router.post(
    "/sessions/{session_id}/predict",
    response_model=SessionPredictResponse,
    responses={**error_responses(404, 409, 413, 422), **SERVING_RESPONSES},
)
async def session_predict(
    session_id: Annotated[str, Path(description="a session id")],
    body: SessionPredictRequest,
    request: Request,
) -> dict[str, Any]:
    """Send the chunk that starts at ``position``; predictions of its steps, state kept.

    A chunk whose ``position`` is not the session's is a ``409`` naming the current one; the
    same chunk sent again (a retry) gets the same answer, and the session does not advance."""
    session_id = checked_id("session", session_id)  # no sync dependency: no thread hop
    predictor = request.app.state.predictor
    row = sessions.cached_session(session_id, body.position) or await run_in_threadpool(
        sessions.load_session, session_id
    )
    chunk_digest = sessions.digest(body.inputs)
    stored = sessions.replay(row, body.position, chunk_digest)
    if stored is not None:
        return stored
    model = await predictor.model(row.model_id)
    try:
        sequences = await predictor.prepare_async(model, [body.inputs])
    except InputError as exc:
        raise chunk_error(exc) from None
    state = sessions.stored_state(row)
    output = await predictor.run(
        row.model_id,
        Job(sequences, states=[state]),
        kind="session",
        disconnected=disconnect_waiter(request.receive),
    )
    try:
        result = answer(output, probabilities=False)
    except InputError as exc:
        raise chunk_error(exc) from None
    predictions = result["predictions"][0]
    steps = len(sequences[0])
    reply = {
        "session_id": session_id,
        "position": body.position + steps,
        "predictions": predictions if model.task_info.per_step else [predictions],
    }
    return await sessions.store_step(
        sessions.Advance(
            row,
            position=body.position,
            steps=steps,
            chunk_digest=chunk_digest,
            state=output.states[0],
            answer=reply,
        )
    )
