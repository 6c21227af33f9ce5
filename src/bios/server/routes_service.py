"""Service routes: client/config, healthz, telemetry, capabilities, retrieve_future, and the
API key's own description (`/auth/apikey/me`, what `tinker auth login` and `logout` call).
Sessions are in `routes_sessions.py`."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from bios.errors import NotFoundError
from bios.server.auth import Tenant, hash_key
from bios.server.state import RESULT_LOST, State
from bios.server.wire import FutureBody, encode_result, error_category

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


@router.post("/telemetry")
def telemetry(tenant: Tenant) -> dict:
    return {"status": "accepted"}  # accepted and dropped: Bios collects no telemetry


@router.get("/get_server_capabilities")
def capabilities(state: State, tenant: Tenant) -> dict:
    # Every served model can be trained and sampled (both run on the same loaded weights).
    # A server started without --model serves any model it can load, and lists none.
    models = []
    for name in state.config.models:
        worker = state.engine.worker(name)
        models.append(
            {
                "model_name": name,
                "max_context_length": worker.max_length,
                "trainable": True,
                "sampleable": True,
            }
        )
    return {"supported_models": models}


NO_KEYS = (
    "this server runs without API keys (auth is off: every request acts for the one local "
    "tenant, whatever key it sends); there is no key to describe or delete"
)


def key_answer(state, request: Request) -> dict | JSONResponse:
    """The presented key's row, or the answer to send instead (with `detail`, which the SDK's
    CLI shows, beside Bios's `error`)."""
    if not state.config.auth:
        return JSONResponse({"error": NO_KEYS, "detail": NO_KEYS, "category": "user"}, 404)
    row = state.store.key(hash_key(request.headers.get("x-api-key", "")))
    if row is None:
        message = "X-API-Key: missing, unknown or revoked API key"
        return JSONResponse({"error": message, "detail": message, "category": "user"}, 401)
    return row


@router.get("/auth/apikey/me")
def api_key_me(request: Request, state: State) -> Response:
    """The presented key, as the SDK's CLI reads it (`SelfApiKeyResponse`): its number, its
    shown prefix as name, and who it acts for (Bios has tenants, not users and organizations:
    the tenant is reported as the user, the organization is the server)."""
    row = key_answer(state, request)
    if isinstance(row, JSONResponse):
        return row
    created = datetime.fromtimestamp(row["created"], UTC).isoformat()
    return JSONResponse(
        {
            "key_id": row["key_id"],
            "name": row["key_prefix"],
            "note": f"bios key of tenant {row['tenant']!r}, created {created}",
            "details": {
                "org_details": {"name": "bios"},
                "user_details": {"email": row["tenant"]},
            },
        }
    )


@router.delete("/auth/apikey/me")
def delete_api_key_me(request: Request, state: State) -> Response:
    """Revoke the presented key (`tinker auth logout`): it cannot revoke any other."""
    row = key_answer(state, request)
    if isinstance(row, JSONResponse):
        return row
    state.store.revoke_key(hash_key(request.headers["x-api-key"]))
    return JSONResponse({})


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
