"""Service routes: client/config, healthz, sessions, telemetry, capabilities, retrieve_future."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bios.errors import NotFoundError
from bios.server.auth import Tenant
from bios.server.state import RESULT_LOST, State
from bios.server.wire import FutureBody, HeartbeatBody, SessionBody, encode_result, error_category

router = APIRouter()


@router.post("/client/config")
def client_config(tenant: Tenant) -> dict:
    # Defaults of the SDK's ClientConfigResponse, stated so a reader sees what we rely on:
    # no JWT exchange, uncompressed protobuf, chunks sent in parallel (ordered by seq_id).
    return {
        "pjwt_auth_enabled": False,
        "parallel_fwdbwd_chunks": True,
        "proto_compress_fwdbwd": False,
        "custom_loss_server_side": False,
        "sample_use_retrieve_futures": False,
    }


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.post("/create_session")
def create_session(body: SessionBody, state: State, tenant: Tenant) -> dict:
    session_id = f"session-{uuid.uuid4().hex[:16]}"
    state.store.add_session(
        session_id, tenant, body.sdk_version, body.tags, body.user_metadata or {}
    )
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(body: HeartbeatBody, state: State, tenant: Tenant) -> dict:
    row = state.store.session(body.session_id)
    if row is None or row["tenant"] != tenant or not state.store.heartbeat(body.session_id):
        raise NotFoundError(f"session_id: no session {body.session_id!r}")
    return {"type": "session_heartbeat"}


@router.post("/telemetry")
def telemetry(tenant: Tenant) -> dict:
    return {"status": "accepted"}  # accepted and dropped: Bios collects no telemetry


@router.get("/get_server_capabilities")
def capabilities(state: State, tenant: Tenant) -> dict:
    models = []
    for name in state.config.models:
        worker = state.engine.worker(name)
        models.append({"model_name": name, "max_context_length": worker.max_length})
    return {"supported_models": models}


@router.post("/retrieve_future")
async def retrieve_future(
    body: FutureBody, request: Request, state: State, tenant: Tenant
) -> Response:
    state.sequencer.skip_stale_gaps()
    entry = state.futures.get(body.request_id)
    if entry is None or entry.tenant != tenant:
        row = state.store.future(body.request_id)
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"request_id: no request {body.request_id!r}")
        # Known from before a restart: results are not kept across restarts, errors are.
        error = row["error"] if row["status"] == "failed" else RESULT_LOST
        return JSONResponse({"error": error, "category": "server"})
    if not await state.futures.wait(entry, state.config.poll_seconds):
        return JSONResponse(
            {"type": "try_again", "request_id": body.request_id, "queue_state": "active"}
        )
    error = entry.future.exception()
    if error is not None:
        return JSONResponse({"error": str(error), "category": error_category(error)})
    return encode_result(entry.future.result(), request)
