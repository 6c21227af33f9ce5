"""The FastAPI application: Tinker's `/api/v1/...` routes on top of the engine.

Routes are grouped by job, one module per family, each route a module-level function on that
module's `router`: `routes_service.py` (config, sessions, futures), `routes_training.py`,
`routes_sampling.py`, `routes_checkpoints.py`, and Bios's extensions in `routes_bios.py`. A route
gets the server's state and the caller's tenant as FastAPI dependencies (`State`, `Tenant`).
This module assembles them and maps errors to status codes. Every request is read by pydantic;
a bad one gets a 4xx whose body names the field, and the server keeps serving.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from bios import __version__
from bios.errors import InvalidInputError, NotFoundError
from bios.server import (
    routes_bios,
    routes_checkpoints,
    routes_sampling,
    routes_service,
    routes_training,
)
from bios.server.auth import Unauthorized
from bios.server.samplers import QuotaExceeded
from bios.server.state import ServerState
from bios.server.wire import BodyTooLarge, too_large

ROUTERS = (
    routes_service.router,
    routes_training.router,
    routes_sampling.router,
    routes_checkpoints.router,
    routes_bios.router,
)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Bios", version=__version__, summary="Tinker-compatible training server")
    app.state.bios = state
    app.state.archive_url_secret = routes_checkpoints.url_secret_of(state.config.home)
    app.add_exception_handler(InvalidInputError, invalid_input)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(QuotaExceeded, over_quota)
    app.add_exception_handler(RequestValidationError, unreadable)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_middleware(LimitBody, limit=state.config.max_body_bytes)
    api = APIRouter(prefix="/api/v1")
    for router in ROUTERS:
        api.include_router(router)
    app.include_router(api)
    return app


async def invalid_input(request: Request, error: InvalidInputError) -> JSONResponse:
    return JSONResponse({"error": str(error), "field": error.field, "category": "user"}, 400)


async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 404)


async def unauthorized(request: Request, error: Unauthorized) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 401)


async def over_quota(request: Request, error: QuotaExceeded) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 403)


async def unreadable(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()
    ]
    return JSONResponse({"error": "; ".join(problems), "category": "user"}, 422)


async def body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
    return JSONResponse({"error": error.message, "category": "user"}, 413)


class LimitBody:
    """The request-body limit, for any body: one whose `Content-Length` says it is over the
    limit is refused before it is read (an oversize upload costs the server nothing); any other
    (chunked, or with a lying header) is counted as it is read and refused at the first byte
    past the limit, so no more than the limit is ever held. (A zstd body's unpacked size is
    bounded where it is unpacked: `routes_training.decompressed`.)"""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            error = too_large(f"body: {int(length):,} bytes", limit)
            return await JSONResponse({"error": error.message, "category": "user"}, 413)(
                scope, receive, send
            )
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large("body (as read, whatever its headers say)", limit)
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as error:  # read outside a route (FastAPI answers those itself)
            if started:
                raise
            await JSONResponse({"error": error.message, "category": "user"}, 413)(
                scope, receive, send
            )
