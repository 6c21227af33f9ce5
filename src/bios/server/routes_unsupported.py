"""SDK 0.38 routes a self-hosted Bios server does not serve, each answered with a 404 that names
the route and why (not FastAPI's bare "Not Found"), after the key check every route has.

`/client/dynamic_config` stays unrouted: the SDK takes its 404 as "use the defaults". The routes
behind `/client/config` flags Bios leaves off (`retrieve_futures`, `cancel_future`,
`create_custom_loss`, `join_sampling_session`) and `/auth/token` (JWT auth, also off) are never
called by the SDK against Bios.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bios.server.auth import Tenant

UNSERVED = {
    ("PUT", "/sessions/{session_id}/project"): (
        "Bios has no projects to move a session between (a session's project_id is a label "
        "given when it is created)"
    ),
    ("GET", "/sessions/{session_id}/trace_export"): "Bios records no request traces",
    ("GET", "/audit"): "Bios keeps no audit log (its server log records requests)",
    ("GET", "/billing/usage/events"): "Bios does no billing",
    ("GET", "/billing/usage/checkpoints/current"): (
        "Bios does no billing; a tenant's stored bytes are in the checkpoint listings' size_bytes"
    ),
}

router = APIRouter()


def answer(method: str, path: str):
    why = UNSERVED[(method, path)]

    def unserved(tenant: Tenant) -> JSONResponse:
        message = f"{method} /api/v1{path}: not served by Bios: {why}"
        return JSONResponse({"error": message, "detail": message, "category": "user"}, 404)

    unserved.__name__ = f"unserved_{method.lower()}_{path.strip('/').replace('/', '_')}"
    return unserved


for (method, path), _ in UNSERVED.items():
    router.add_api_route(path, answer(method, path), methods=[method], include_in_schema=True)
