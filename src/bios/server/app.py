"""The FastAPI application: Tinker's `/api/v1/...` routes on top of the engine.

Routes are grouped by job: this module has the service routes (config, sessions, futures) and
assembles the rest — `routes_training.py`, `routes_sampling.py`, `routes_checkpoints.py`, and
Bios's extensions in `routes_bios.py`. Every
request is read by pydantic; a bad one gets a 4xx whose body names the field, and the server
keeps serving.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from bios import __version__
from bios.errors import InvalidInputError, NotFoundError
from bios.server import routes_bios, routes_checkpoints, routes_sampling, routes_training
from bios.server.auth import Tenant, Unauthorized
from bios.server.state import RESULT_LOST, QuotaExceeded, ServerState
from bios.server.wire import FutureBody, HeartbeatBody, SessionBody, encode_result, error_category


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Bios", version=__version__, summary="Tinker-compatible training server")
    app.state.bios = state

    @app.exception_handler(InvalidInputError)
    async def invalid_input(request: Request, error: InvalidInputError) -> JSONResponse:
        return JSONResponse({"error": str(error), "field": error.field, "category": "user"}, 400)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
        return JSONResponse({"error": str(error), "category": "user"}, 404)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, error: Unauthorized) -> JSONResponse:
        return JSONResponse({"error": str(error), "category": "user"}, 401)

    @app.exception_handler(QuotaExceeded)
    async def over_quota(request: Request, error: QuotaExceeded) -> JSONResponse:
        return JSONResponse({"error": str(error), "category": "user"}, 403)

    @app.exception_handler(RequestValidationError)
    async def unreadable(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
            for e in error.errors()
        ]
        return JSONResponse({"error": "; ".join(problems), "category": "user"}, 422)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Refused before the body is read: an oversize upload costs the server nothing.
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > state.config.max_body_bytes:
            message = (
                f"body: {int(length):,} bytes is over the limit of {state.config.max_body_bytes:,}"
            )
            return JSONResponse({"error": message, "category": "user"}, 413)
        return await call_next(request)

    api = APIRouter(prefix="/api/v1")
    _service_routes(api, state)
    routes_training.add_routes(api, state)
    routes_sampling.add_routes(api, state)
    routes_checkpoints.add_routes(api, state)
    routes_bios.add_routes(api, state)
    app.include_router(api)
    return app


def _service_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/client/config")
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

    @api.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @api.post("/create_session")
    def create_session(body: SessionBody, tenant: Tenant) -> dict:
        session_id = f"session-{uuid.uuid4().hex[:16]}"
        state.store.add_session(
            session_id, tenant, body.sdk_version, body.tags, body.user_metadata or {}
        )
        return {"type": "create_session", "session_id": session_id}

    @api.post("/session_heartbeat")
    def session_heartbeat(body: HeartbeatBody, tenant: Tenant) -> dict:
        row = state.store.session(body.session_id)
        if row is None or row["tenant"] != tenant or not state.store.heartbeat(body.session_id):
            raise NotFoundError(f"session_id: no session {body.session_id!r}")
        return {"type": "session_heartbeat"}

    @api.post("/telemetry")
    def telemetry() -> dict:
        return {"status": "accepted"}  # accepted and dropped: Bios collects no telemetry

    @api.get("/get_server_capabilities")
    def capabilities(tenant: Tenant) -> dict:
        models = []
        for name in state.config.models:
            worker = state.engine.worker(name)
            models.append({"model_name": name, "max_context_length": worker.max_length})
        return {"supported_models": models}

    @api.post("/retrieve_future")
    async def retrieve_future(body: FutureBody, request: Request, tenant: Tenant) -> Response:
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
