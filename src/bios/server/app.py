"""The FastAPI application: Tinker's `/api/v1/...` routes on top of the engine.

Routes are grouped by job, one module per family, each route a module-level function on that
module's `router`: `routes_service.py` (config, futures, capabilities, the API key),
`routes_sessions.py`, `routes_training.py`, `routes_sampling.py`, `routes_checkpoints.py`,
`routes_external.py` (exports and their downloads), Bios's extensions in `routes_bios.py`, and
the SDK routes Bios answers with a reason in `routes_unsupported.py`. A route
gets the server's state and the caller's tenant as FastAPI dependencies (`State`, `Tenant`).
This module assembles them and maps errors to status codes. Every request is read by pydantic;
a bad one gets a 4xx whose body names the field, and the server keeps serving.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bios import __version__
from bios.errors import InvalidInputError, NotFoundError
from bios.server import (
    routes_bios,
    routes_checkpoints,
    routes_external,
    routes_openai,
    routes_sampling,
    routes_service,
    routes_sessions,
    routes_training,
    routes_unsupported,
)
from bios.server.auth import Unauthorized, tenant_of
from bios.server.console import app as console_app
from bios.server.console.sources import ServerSource
from bios.server.samplers import QuotaExceeded
from bios.server.state import ServerState, SessionFinished
from bios.server.wire import UNSUPPORTED, BodyTooLarge, error_field, problem_of, too_large

CONSOLE_PREFIX = "/console"
ROUTERS = (
    routes_service.router,
    routes_sessions.router,
    routes_training.router,
    routes_sampling.router,
    routes_checkpoints.router,
    routes_external.router,
    routes_bios.router,
    routes_unsupported.router,
)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="Bios", version=__version__, summary="Tinker-compatible training server")
    app.state.bios = state
    app.state.archive_url_secret = routes_checkpoints.url_secret_of(state.config.home)
    app.add_exception_handler(InvalidInputError, invalid_input)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(QuotaExceeded, over_quota)
    app.add_exception_handler(SessionFinished, session_finished)
    app.add_exception_handler(RequestValidationError, unreadable)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_middleware(LimitBody, limit=state.config.max_body_bytes)
    api = APIRouter(prefix="/api/v1")
    for router in ROUTERS:
        api.include_router(router)
    app.include_router(api)
    # OpenAI's API, an application of its own so that its errors keep OpenAI's shape.
    app.mount(routes_openai.PREFIX, routes_openai.create_app(state))
    # The web console: HTML pages behind a login cookie, with errors of its own.
    app.mount(CONSOLE_PREFIX, console_app.create_app(ServerSource(state)))
    return app


async def invalid_input(request: Request, error: InvalidInputError) -> JSONResponse:
    return JSONResponse({"error": str(error), "field": error.field, "category": "user"}, 400)


async def not_found(request: Request, error: NotFoundError) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 404)


async def unauthorized(request: Request, error: Unauthorized) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 401)


async def over_quota(request: Request, error: QuotaExceeded) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 403)


async def session_finished(request: Request, error: SessionFinished) -> JSONResponse:
    return JSONResponse({"error": str(error), "category": "user"}, 410)


async def unreadable(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body pydantic could not read: 422 naming each field, except that a field Bios does not
    implement, or a value of one it cannot honour, is a 400 naming the first such field (the
    same answer as any other refused input: `invalid_input`)."""
    errors = error.errors()
    refused = [e for e in errors if e["type"] in ("extra_forbidden", UNSUPPORTED)]
    first = refused[0] if refused else errors[0]
    field = error_field(tuple(first["loc"][1:]))
    await run_in_threadpool(take_the_turn, request, error.body, field, problem_of(first))
    if refused:
        message = f"{field}: {problem_of(first)}"
        return JSONResponse({"error": message, "field": field, "category": "user"}, 400)
    problems = [f"{error_field(tuple(e['loc'][1:]))}: {e['msg']}" for e in errors]
    return JSONResponse({"error": "; ".join(problems), "category": "user"}, 422)


def take_the_turn(request: Request, body: object, field: str, problem: str) -> None:
    """A refused body that names a run of the caller's and a `seq_id` still takes that turn
    (`routes_training.refused_in_turn`), so the run's next requests are not held up."""
    turn = routes_training.turn_of(body)
    if turn is None:
        return
    try:
        tenant = tenant_of(request)
        routes_training.refused_in_turn(
            request.app.state.bios, turn, tenant, InvalidInputError(field, problem)
        )
    except (InvalidInputError, NotFoundError, Unauthorized, SessionFinished):
        pass  # the turn's refusal itself, or a run not (or no longer) the caller's to train


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
            return await too_large_response(scope, error.message)(scope, receive, send)
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
            await too_large_response(scope, error.message)(scope, receive, send)


def too_large_response(scope, message: str) -> JSONResponse:
    """The 413 in the shape of the API the request was for (OpenAI's under `/v1`)."""
    if routes_openai.is_openai_path(scope.get("path", "")):
        return routes_openai.error_response(413, message)
    return JSONResponse({"error": message, "category": "user"}, 413)
